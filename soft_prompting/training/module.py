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
ids it saved. Under ``training.strategy=fsdp`` :meth:`configure_model` shards the pair's decoder
layers over the ranks itself (see sharding.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from soft_prompting import run_files
from soft_prompting.errors import DivergenceError, ModelLoadError
from soft_prompting.maths.chunked_head import chunked_head_divergence
from soft_prompting.maths.divergence import get_divergence, masked_mean
from soft_prompting.pair.loading import ModelPair, ModelPairManager
from soft_prompting.pair.sharding import shard_pair

log = logging.getLogger(__name__)

# Architectures whose logits are exactly ``lm_head(base_model(...).last_hidden_state)``, so the
# divergence can be taken from the hidden states chunk by chunk (see chunked_divergence.py). Others
# (final-logit softcapping, logit scales) use the generic path through full logits.
_PLAIN_HEAD_MODEL_TYPES = frozenset(
    "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe gemma phi3 olmo olmo2 gpt2 gpt_neox "
    "smollm3 starcoder2 stablelm".split()
)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


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
        compile: ``torch.compile`` the frozen models' forward (first steps pay the compile time).
        torch_dtype, load_in_8bit, load_in_4bit, trust_remote_code, revision_1, revision_2,
            device_map: how the pair is loaded (see :class:`~soft_prompting.pair.loading.ModelPairManager`).
        seed: seeds the random prompt initialisation.
        on_policy_weight: weight of :meth:`on_policy_divergence`, the divergence on model_1's own
            soft-prompted continuations (0: off).
        on_policy_tokens: tokens sampled per text for that term.
        pair: an already loaded pair to use instead of loading by name (not saved in checkpoints).
        pair_device: where a pair loaded by name goes: ``auto`` (the best device here), ``cpu``,
            ``cuda:N`` … (see :func:`~soft_prompting.pair.placement.resolve_device`; quantised and
            ``device_map`` pairs place themselves). Not saved: a checkpoint opens wherever it is
            loaded.
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
        compile: bool = False,
        torch_dtype: str = "auto",
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        trust_remote_code: bool = False,
        revision_1: str | None = None,
        revision_2: str | None = None,
        device_map: str | None = None,
        seed: int = 0,
        on_policy_weight: float = 0.0,
        on_policy_tokens: int = 8,
        pair: ModelPair | None = None,
        pair_device: str = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pair", "pair_device"])
        self.divergence_fn = get_divergence(divergence)
        if pair is None:
            pair = ModelPairManager(
                device=pair_device,
                torch_dtype=torch_dtype,
                load_in_8bit=load_in_8bit,
                load_in_4bit=load_in_4bit,
                trust_remote_code=trust_remote_code,
                device_map=device_map,
            ).load_model_pair(model_1_name, model_2_name, revision_1, revision_2)
        # A plain dataclass, not a child module: see the module docstring.
        self.pair = pair
        if gradient_checkpointing:
            for model in (pair.model_1, pair.model_2):
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
                _checkpoint_in_eval_mode(model)
        # Plain linear heads: the divergence never materialises the full [B, T, V] logits.
        self.fused_head = all(_has_plain_head(m) for m in (pair.model_1, pair.model_2))
        self._compiled: dict[int, torch.nn.Module] = {}
        # The frozen pair's divergence on a validation batch without the prompt never changes.
        self._no_prompt_divergence: dict[bytes, torch.Tensor] = {}
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

    @property
    def max_text_length(self) -> int | None:
        """Text tokens that fit in the models' context after the virtual tokens (None: unknown)."""
        context = getattr(self.pair.model_1.config, "max_position_embeddings", None)
        return None if context is None else context - self.hparams.num_soft_prompt_tokens

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's loader, after :func:`~soft_prompting.run_files.read_checkpoint` has checked
        the file (one clear error, never an unpickled object)."""
        run_files.read_checkpoint(checkpoint_path)
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_same_pair(checkpoint.get("hyper_parameters") or {}, self.hparams, "the checkpoint")
        saved = checkpoint.get("state_dict", {}).get("soft_prompt")
        if saved is not None and saved.shape != self.soft_prompt.shape:
            raise ModelLoadError(
                f"the checkpoint's soft prompt has shape {tuple(saved.shape)} (virtual tokens, "
                f"hidden size) but this run needs {tuple(self.soft_prompt.shape)}: it comes from "
                "another model pair or prompt length; resume with a checkpoint of this pair and "
                "training.num_soft_prompt_tokens, or drop ckpt_path to start fresh"
            )

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
        prompt = self._prompt(use_prompt, prompt)
        return tuple(
            self._model_logits(model, input_ids, attention_mask, prompt)
            for model in (self.pair.model_1, self.pair.model_2)
        )

    def _prompt(self, use_prompt: bool, prompt: torch.Tensor | None) -> torch.Tensor | None:
        """The embeddings to prepend: ``prompt`` if given, else the trained one; None without."""
        if not use_prompt:
            return None
        return self.soft_prompt if prompt is None else prompt

    def _model_inputs(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt: torch.Tensor | None,
    ) -> dict:
        embeds = model.get_input_embeddings()(input_ids)
        mask = attention_mask
        if prompt is not None:
            batch, n_virtual = input_ids.shape[0], prompt.shape[0]
            prompt = prompt.to(embeds.device, embeds.dtype)  # a prompt read from a file: CPU
            prompt_embeds = prompt.unsqueeze(0).expand(batch, -1, -1)
            embeds = torch.cat([prompt_embeds, embeds], dim=1)
            mask = torch.cat([mask.new_ones(batch, n_virtual), mask], dim=1)
        # Positions count real tokens only, so padding never shifts the text's positions.
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": False,
        }

    def _model_logits(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt: torch.Tensor | None,
    ) -> torch.Tensor:
        inputs = self._model_inputs(model, input_ids, attention_mask, prompt)
        out = self._maybe_compiled(model)(**inputs, logits_to_keep=input_ids.shape[1])
        return out.logits[..., : self.pair.vocab_size]

    def _text_hidden_states(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[B, L, H]`` final (normed) hidden states at the text positions, before the lm_head."""
        inputs = self._model_inputs(model, input_ids, attention_mask, prompt)
        out = self._maybe_compiled(model.base_model)(**inputs)
        return out.last_hidden_state[:, -input_ids.shape[1] :]

    def _maybe_compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.hparams.get("compile", False):
            return model
        # A plain dict, not an attribute: a compiled wrapper must not become a child module.
        if id(model) not in self._compiled:
            self._compiled[id(model)] = torch.compile(model)
        return self._compiled[id(model)]

    def divergence(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        use_prompt: bool = True,
        prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean per-token divergence over the real text positions of the batch (a scalar).

        With plain linear heads (``self.fused_head``) the logits are computed a chunk of positions
        at a time and never exist whole; the value and gradient are those of the generic path.
        """
        if self.fused_head:
            self._sync_pair_device()
            prompt = self._prompt(use_prompt, prompt)
            models = (self.pair.model_1, self.pair.model_2)
            hidden_1, hidden_2 = (
                self._text_hidden_states(m, input_ids, attention_mask, prompt) for m in models
            )
            vocab_size = self.pair.vocab_size
            return chunked_head_divergence(
                hidden_1,
                hidden_2,
                attention_mask.bool(),
                models[0].get_output_embeddings(),
                models[1].get_output_embeddings(),
                self.divergence_fn,
                vocab_size,
            )
        logits_1, logits_2 = self.pair_logits(input_ids, attention_mask, use_prompt, prompt)
        per_position = self.divergence_fn(logits_1, logits_2)
        return masked_mean(per_position, attention_mask.bool())

    @torch.no_grad()
    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        use_prompt: bool = True,
    ) -> torch.Tensor:
        """model_1's sampled continuations of left-padded texts, the soft prompt prepended.

        Returns:
            ``[B, max_new_tokens]`` new token ids (after an end-of-sequence token: padding).
        """
        self._sync_pair_device()
        model, tokenizer = self.pair.model_1, self.pair.tokenizer
        prompt = self.soft_prompt.detach() if use_prompt else None
        inputs = self._model_inputs(model, input_ids, attention_mask, prompt)
        sample = temperature > 0
        out = model.generate(
            inputs_embeds=inputs["inputs_embeds"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=0 if sample else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        # With inputs_embeds, generate returns the new tokens only.
        new = out[:, -max_new_tokens:] if out.shape[1] >= max_new_tokens else out
        return new.clamp(max=self.pair.vocab_size - 1)

    def on_policy_divergence(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Divergence on model_1's own continuations, with a score-function gradient.

        model_1 samples ``on_policy_tokens`` tokens after each text with the soft prompt prepended;
        ``D_i`` is the pair's mean divergence on sample ``i``'s positions. The returned surrogate
        has the value ``mean(D)`` and the gradient of ``E_{y ~ p_1(.|prompt)}[D(y)]``:
        ``mean(grad D_i) + mean((D_i - mean D) grad log p_1(y_i))`` (REINFORCE, mean baseline).
        So the prompt is rewarded for steering model_1 into text where the pair parts ways, not
        only for divergence on the given texts.
        """
        from soft_prompting.hard_prompts.sampling import continuation_mask

        n = self.hparams.get("on_policy_tokens", 8)
        sampled = self.sample(input_ids, attention_mask, n, temperature=1.0)
        sampled_mask = continuation_mask(sampled, self.tokenizer.eos_token_id)
        full_ids = torch.cat([input_ids, sampled], dim=1)
        full_mask = torch.cat([attention_mask, sampled_mask.to(attention_mask.dtype)], dim=1)
        logits_1, logits_2 = self.pair_logits(full_ids, full_mask)
        # Position L-1+t predicts sampled token t.
        start = input_ids.shape[1] - 1
        logits_1, logits_2 = logits_1[:, start:-1], logits_2[:, start:-1]
        per_token = self.divergence_fn(logits_1, logits_2)
        weights = sampled_mask.float()
        per_sample = (per_token * weights).sum(-1) / weights.sum(-1).clamp(min=1)
        log_p = logits_1.float().log_softmax(-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        log_p = (log_p * weights).sum(-1)
        advantage = (per_sample - per_sample.mean()).detach()
        return per_sample.mean() + (advantage * log_p).mean()

    # ------------------------------------------------------------------ Lightning hooks
    def configure_model(self) -> None:
        """Shard the frozen pair's decoder layers over the ranks when the strategy asks for it.

        Lightning calls this on every rank before each fit/validate; only its model-parallel
        strategy (``training.strategy=fsdp``) sets ``self.device_mesh``.
        """
        if self.device_mesh is not None:
            root_device = self.trainer.strategy.root_device
            shard_pair((self.pair.model_1, self.pair.model_2), root_device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        divergence = self.divergence(batch["input_ids"], batch["attention_mask"])
        if self.hparams.get("on_policy_weight", 0.0) > 0:
            on_policy = self.on_policy_divergence(batch["input_ids"], batch["attention_mask"])
            self.log("train/on_policy_divergence", on_policy, batch_size=len(batch["input_ids"]))
            divergence = divergence + self.hparams.on_policy_weight * on_policy
        scale, logged, _ = self._data_parallel_scale(divergence, batch["attention_mask"])
        # The global mean: a NaN on any rank stops every rank here, instead of leaving the others
        # waiting in the next collective.
        if not torch.isfinite(logged):
            raise DivergenceError(
                f"the divergence became {logged.item()} at training batch {batch_idx}: lower "
                "training.learning_rate, use model_pair.torch_dtype=float32, or keep "
                f"training.norm_constraint=true; {self._last_checkpoint_note()}"
            )
        self.log("train/divergence", logged, prog_bar=True, batch_size=len(batch["input_ids"]))
        return -divergence * scale

    def _last_checkpoint_note(self) -> str:
        """Where the last good prompt is, or that there is none (never promise a missing file)."""
        callback = getattr(self._trainer, "checkpoint_callback", None)
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if last and Path(last).is_file():
            return f"{last} holds the last good prompt (resume with ckpt_path=last)"
        return "no checkpoint was written before it (training.checkpoint_every_n_steps: how often)"

    def _data_parallel_scale(
        self, divergence: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor | float, torch.Tensor]:
        """Loss scale that makes data-parallel training equal to one process on the global batch.

        Rank ``r`` of ``W`` holds ``n_r`` text tokens whose divergences sum to ``S_r``; its loss is
        the mean ``S_r / n_r``. DDP averages gradients, ``(1/W) sum_r grad(S_r / n_r)``, which is
        not the gradient of the global batch's token-weighted mean ``sum_r S_r / N`` (with
        ``N = sum_r n_r``) unless every rank holds as many tokens. Scaling rank ``r``'s loss by
        ``W n_r / N`` makes the two equal.

        Returns:
            ``(scale, global mean divergence, texts in the global batch)``; ``(1.0, divergence,
            local texts)`` in a single process. (A batch too small to split goes whole to every
            rank, see :class:`~soft_prompting.data.datamodule.ResumableBatchSampler`: its mean and gradient
            stay exact, its text count is multiplied by the world size.)
        """
        world = self._trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return 1.0, divergence, len(attention_mask)
        local = attention_mask.sum().to(divergence.device, torch.float32)
        sums = torch.stack(
            [local, divergence.detach() * local, local.new_tensor(len(attention_mask))]
        )
        total_tokens, total_divergence, texts = self.trainer.strategy.reduce(sums, reduce_op="sum")
        return world * local / total_tokens, total_divergence / total_tokens, int(texts)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Both divergences of the global validation batch (each rank scores its own slice)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        _, with_prompt, size = self._data_parallel_scale(self.divergence(ids, mask), mask)
        _, without, _ = self._data_parallel_scale(self._divergence_without_prompt(ids, mask), mask)
        # Already the global values on every rank; sync_dist only averages equal numbers (and keeps
        # Lightning from warning that the epoch value might differ between ranks).
        self.log("val/divergence", with_prompt, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/divergence_no_prompt", without, batch_size=size, sync_dist=True)

    def _divergence_without_prompt(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The bare pair's divergence on a batch, computed once per distinct batch and precision:
        only the prompt trains, so repeated validations pay for the bare pair once."""
        kind = ids.device.type
        autocast = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind)
        key = (
            repr((tuple(ids.shape), autocast)).encode()
            + torch.cat([ids, mask]).cpu().numpy().tobytes()
        )
        if key not in self._no_prompt_divergence:
            self._no_prompt_divergence[key] = self.divergence(ids, mask, use_prompt=False).detach()
        return self._no_prompt_divergence[key]

    def on_before_optimizer_step(self, optimizer) -> None:
        # With the pair sharded there is no DDP wrapper to average the (replicated) prompt's
        # gradient over the ranks: the module does it, once per optimiser step.
        if self.device_mesh is not None and self.trainer.world_size > 1:
            torch.distributed.all_reduce(self.soft_prompt.grad)
            self.soft_prompt.grad.div_(self.trainer.world_size)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: callbacks (the checkpoint) run before the module's
        # batch-end hook and would save the unprojected prompt, so a resumed run would diverge.
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
        weights = self.soft_prompt.detach().float().cpu().contiguous()
        hparams = json.dumps({k: v for k, v in self.hparams.items()}, indent=2, default=str)
        # Every file goes to a temporary name first: a full disk never leaves a half-written
        # adapter, and the adapter written before stays whole.
        with (
            run_files.atomic_path(directory / "adapter_config.json") as target,
            tempfile.TemporaryDirectory(dir=directory, prefix=".adapter.") as staging,
        ):
            config.save_pretrained(staging)
            shutil.copyfile(Path(staging) / "adapter_config.json", target)
        with run_files.atomic_path(directory / "adapter_model.safetensors") as target:
            save_file({"prompt_embeddings": weights}, str(target))
        run_files.write_text(directory / "soft_prompting.json", hparams)
        return directory


PAIR_KEYS = ("model_1_name", "model_2_name", "revision_1", "revision_2")
"""What makes a soft prompt belong to one pair: a prompt is meaningless for any other."""


def check_same_pair(saved: Mapping, current: Mapping, source: str) -> None:
    """Refuse a checkpoint whose saved pair differs from this run's, naming the override.

    Args:
        saved: the checkpoint's hyperparameters.
        current: this run's (the module's hparams or the train config's module arguments).
        source: how the message names the checkpoint.
    """
    differing = [
        key
        for key in PAIR_KEYS
        if key in saved and not _same_model(saved.get(key), current.get(key))
    ]
    if differing:
        was = " ".join(f"model_pair.{key}={saved.get(key)}" for key in differing)
        now = ", ".join(f"{key}={current.get(key)!r}" for key in differing)
        raise ModelLoadError(
            f"{source} was trained on another model pair ({now} in this run): resume with {was}, "
            "or drop ckpt_path to start fresh"
        )


def _same_model(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def _has_plain_head(model: torch.nn.Module) -> bool:
    """True when ``model``'s logits are exactly ``lm_head(base_model(...).last_hidden_state)``."""
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    return (
        config.model_type in _PLAIN_HEAD_MODEL_TYPES
        and model.base_model is not model
        and type(model.get_output_embeddings()) is torch.nn.Linear
    )


def _checkpoint_in_eval_mode(model: torch.nn.Module) -> None:
    """Make Hugging Face checkpoint the layers of a frozen model kept in eval mode.

    HF recomputes a layer only when that layer is in training mode, and the frozen pair stays in
    eval mode (no dropout), so ``gradient_checkpointing_enable`` alone does nothing here. Only the
    checkpointed layer modules themselves are flagged as training; their children (attention,
    dropout) stay in eval mode, so the numerics do not change.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the layers carry the flag themselves
        GradientCheckpointingLayer = torch.nn.Module  # noqa: N806
    for layer in model.modules():
        if layer is not model and isinstance(layer, GradientCheckpointingLayer):
            if getattr(layer, "gradient_checkpointing", False):
                layer.training = True
