"""The LightningModule: a frozen model pair and one trainable soft prompt between them.

The soft prompt is ``num_soft_prompt_tokens`` virtual-token embeddings prepended to the input
embeddings of *both* frozen models. Training maximises the divergence of their next-token
distributions on the real text positions (never on virtual tokens or padding), so the loss is the
negative divergence.

Layout of one row, as both models see it (the texts come left-padded from the datamodule)::

    [v_1 … v_P] [pad … pad] [t_1 … t_L]
    positions:   0 … P-1      (masked)     P … P+L-1

Only the soft prompt is a registered parameter. The frozen pair is held outside the module's
children, so checkpoints hold kilobytes (the prompt and plain hyperparameters), DDP never sees the
frozen weights, and ``DivergenceModule.load_from_checkpoint(path)`` rebuilds the pair from the model
ids it saved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from soft_prompting.divergence import get_divergence, masked_mean
from soft_prompting.models import ModelPair, ModelPairManager

log = logging.getLogger(__name__)


class DivergenceModule(pl.LightningModule):
    """Trains a soft prompt that makes ``model_1`` and ``model_2`` disagree.

    Args:
        model_1_name: reference model (hub id, local folder or ``organism:NAME``).
        model_2_name: compared model.
        num_soft_prompt_tokens: virtual tokens in the prompt.
        learning_rate: Adam learning rate of the prompt.
        divergence: ``kl`` (KL(p1||p2)), ``reverse_kl`` or ``js``.
        init: ``random`` or ``text``.
        init_text: text whose model_1 embeddings initialise the prompt when ``init="text"``.
        norm_constraint: keep each virtual token's norm within model_1's real-token norm range.
        weight_decay: Adam weight decay.
        gradient_checkpointing: recompute the frozen models' activations in backward.
        torch_dtype, load_in_8bit, load_in_4bit, trust_remote_code, revision_1, revision_2: how the
            pair is loaded (see :class:`~soft_prompting.models.ModelPairManager`).
        seed: seeds the random prompt initialisation.
        pair: an already loaded pair to use instead of loading by name (not saved in checkpoints).
    """

    def __init__(
        self,
        model_1_name: str,
        model_2_name: str,
        num_soft_prompt_tokens: int = 8,
        learning_rate: float = 0.03,
        divergence: str = "kl",
        init: str = "random",
        init_text: str = "",
        norm_constraint: bool = True,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        torch_dtype: str = "auto",
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        trust_remote_code: bool = False,
        revision_1: str | None = None,
        revision_2: str | None = None,
        seed: int = 0,
        pair: ModelPair | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pair"])
        self.divergence_fn = get_divergence(divergence)
        if pair is None:
            device = "cuda" if (load_in_8bit or load_in_4bit) else "cpu"
            pair = ModelPairManager(
                device=device,
                torch_dtype=torch_dtype,
                load_in_8bit=load_in_8bit,
                load_in_4bit=load_in_4bit,
                trust_remote_code=trust_remote_code,
            ).load_model_pair(model_1_name, model_2_name, revision_1, revision_2)
        # A plain dataclass, not a child module: see the module docstring.
        self.pair = pair
        if gradient_checkpointing:
            for model in (pair.model_1, pair.model_2):
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        embeddings = pair.model_1.get_input_embeddings().weight.detach().float()
        norms = embeddings[: pair.vocab_size].norm(dim=-1)
        self.register_buffer("norm_range", torch.stack([norms.min(), norms.max()]))
        self.soft_prompt = torch.nn.Parameter(self._initial_prompt(embeddings))

    # ------------------------------------------------------------------ construction
    def _initial_prompt(self, embeddings: torch.Tensor) -> torch.Tensor:
        n, hp = self.hparams.num_soft_prompt_tokens, self.hparams
        if hp.init == "text":
            ids = self.pair.tokenizer(hp.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"init_text={hp.init_text!r} tokenizes to nothing")
            ids = (ids * n)[:n]
            return embeddings[ids].clone()
        generator = torch.Generator().manual_seed(hp.seed)
        # Random real-token embeddings: the right scale and a start inside the embedding manifold.
        ids = torch.randint(0, self.pair.vocab_size, (n,), generator=generator)
        return embeddings[ids].clone()

    @property
    def tokenizer(self):
        return self.pair.tokenizer

    def _sync_pair_device(self) -> None:
        if self.pair.device != self.soft_prompt.device:
            self.pair.to(self.soft_prompt.device)

    # ------------------------------------------------------------------ the maths
    def pair_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        use_prompt: bool = True,
        prompt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' next-token logits at the text positions.

        Args:
            input_ids: ``[B, L]`` left-padded text.
            attention_mask: ``[B, L]``, 1 on real tokens.
            use_prompt: prepend the soft prompt (False scores the bare text).
            prompt: ``[P, H]`` embeddings to prepend instead of the trained prompt.

        Returns:
            ``(logits_1, logits_2)``, each ``[B, L, V]`` (V = the tokenizer's real vocabulary);
            position ``t`` predicts text token ``t + 1``.
        """
        self._sync_pair_device()
        if use_prompt:
            prompt = self.soft_prompt if prompt is None else prompt
        else:
            prompt = None
        return tuple(
            self._model_logits(model, input_ids, attention_mask, prompt)
            for model in (self.pair.model_1, self.pair.model_2)
        )

    def _model_logits(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt: torch.Tensor | None,
    ) -> torch.Tensor:
        embeds = model.get_input_embeddings()(input_ids)
        mask = attention_mask
        if prompt is not None:
            batch, n_virtual = input_ids.shape[0], prompt.shape[0]
            prompt_embeds = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            embeds = torch.cat([prompt_embeds, embeds], dim=1)
            mask = torch.cat([mask.new_ones(batch, n_virtual), mask], dim=1)
        # Positions count real tokens only, so padding never shifts the text's positions.
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=input_ids.shape[1],
        )
        return out.logits[..., : self.pair.vocab_size]

    def divergence(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        use_prompt: bool = True,
        prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean per-token divergence over the real text positions of the batch (a scalar)."""
        logits_1, logits_2 = self.pair_logits(input_ids, attention_mask, use_prompt, prompt)
        per_position = self.divergence_fn(logits_1, logits_2)
        return masked_mean(per_position, attention_mask.bool())

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        divergence = self.divergence(batch["input_ids"], batch["attention_mask"])
        if not torch.isfinite(divergence):
            raise FloatingPointError(
                f"the divergence became {divergence.item()} at training batch {batch_idx}: lower "
                "training.learning_rate, use model_pair.torch_dtype=float32, or keep "
                "training.norm_constraint=true; the last good checkpoint is kept"
            )
        self.log("train/divergence", divergence, prog_bar=True, batch_size=len(batch["input_ids"]))
        return -divergence

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        size = len(batch["input_ids"])
        with_prompt = self.divergence(batch["input_ids"], batch["attention_mask"])
        without = self.divergence(batch["input_ids"], batch["attention_mask"], use_prompt=False)
        self.log("val/divergence", with_prompt, prog_bar=True, batch_size=size)
        self.log("val/divergence_no_prompt", without, batch_size=size)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.hparams.norm_constraint:
            self.project_prompt_norms()

    @torch.no_grad()
    def project_prompt_norms(self) -> None:
        """Rescale virtual tokens whose norm left model_1's real-token range back to its edge."""
        low, high = self.norm_range.to(self.soft_prompt.device)
        norms = self.soft_prompt.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        self.soft_prompt.mul_(norms.clamp(low, high) / norms)

    def configure_optimizers(self):
        return torch.optim.Adam(
            [self.soft_prompt],
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
        )

    # ------------------------------------------------------------------ export
    def save_soft_prompt(self, directory: str | Path) -> Path:
        """Write the prompt in PEFT's prompt-tuning format.

        ``PeftModel.from_pretrained(model_1, directory)`` loads it; the PEFT model then prepends
        the same embeddings this module trained.
        """
        from peft import PromptTuningConfig, TaskType

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_config = self.pair.model_1.config
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=self.hparams.num_soft_prompt_tokens,
            token_dim=self.pair.hidden_size,
            num_transformer_submodules=1,
            num_attention_heads=getattr(model_config, "num_attention_heads", None),
            num_layers=getattr(model_config, "num_hidden_layers", None),
            base_model_name_or_path=self.hparams.model_1_name,
        )
        config.save_pretrained(str(directory))
        weights = self.soft_prompt.detach().float().cpu().contiguous()
        save_file({"prompt_embeddings": weights}, str(directory / "adapter_model.safetensors"))
        (directory / "soft_prompting.json").write_text(
            json.dumps({k: v for k, v in self.hparams.items()}, indent=2, default=str)
        )
        return directory
