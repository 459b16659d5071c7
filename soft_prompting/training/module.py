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

import inspect
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from soft_prompting import run_files
from soft_prompting.errors import DivergenceError, ModelLoadError
from soft_prompting.maths.chunked_head import chunked_head_divergence, chunked_head_divergences
from soft_prompting.maths.divergence import get_divergence, masked_mean
from soft_prompting.maths.diversity import diversity_penalty
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
        num_prompts: soft prompts trained together (``K``). With ``K > 1`` the prompt is a
            ``[K, P, H]`` parameter, each batch is replicated over the K prompts inside one forward
            of each frozen model, and the loss is ``-mean_k D_k + diversity_weight *
            sg(mean_k D_k) *`` :func:`~soft_prompting.maths.diversity.diversity_penalty` of their
            per-text divergences (see :meth:`_several_prompts_step`). ``K = 1`` keeps the ``[P, H]`` prompt and the single-prompt code path.
        diversity_weight: weight of that penalty (used only when ``num_prompts > 1``).
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
        num_prompts: int = 1,
        diversity_weight: float = 1.0,
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
        # Which of several prompts the hard-prompt strategies use (see :meth:`using_prompt`).
        self._prompt_index = 0
        self.soft_prompt = torch.nn.Parameter(self._initial_prompt(embeddings))

    # ------------------------------------------------------------------ construction
    def _initial_prompt(self, embeddings: torch.Tensor) -> torch.Tensor:
        n, hp = self.hparams.num_soft_prompt_tokens, self.hparams
        if hp.init == "text":
            ids = self.pair.tokenizer(hp.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"init_text={hp.init_text!r} tokenizes to nothing")
            ids = (ids * n)[:n]
            # Several prompts all start from the text; the ordered diversity term parts them.
            return self._stack_prompts([embeddings[ids].clone()] * self.num_prompts)
        generator = torch.Generator().manual_seed(hp.seed)
        # Random real-token embeddings: the right scale and a start inside the embedding manifold.
        # Prompt 0 draws first, so it starts where a single prompt of this seed starts.
        draws = [
            torch.randint(0, self.pair.vocab_size, (n,), generator=generator)
            for _ in range(self.num_prompts)
        ]
        return self._stack_prompts([embeddings[ids].clone() for ids in draws])

    @staticmethod
    def _stack_prompts(prompts: list[torch.Tensor]) -> torch.Tensor:
        """``[P, H]`` for one prompt (the layout of every single-prompt checkpoint), else
        ``[K, P, H]``."""
        return prompts[0] if len(prompts) == 1 else torch.stack(prompts)

    @property
    def num_prompts(self) -> int:
        """Soft prompts trained together (checkpoints from before the option hold one)."""
        return int(self.hparams.get("num_prompts", 1))

    @property
    def prompts(self) -> torch.Tensor:
        """``[K, P, H]``: the trained prompts (a view of :attr:`soft_prompt`, also for K = 1)."""
        return self.soft_prompt if self.soft_prompt.dim() == 3 else self.soft_prompt.unsqueeze(0)

    @property
    def active_prompt(self) -> torch.Tensor:
        """``[P, H]``: the prompt the hard-prompt strategies use now (prompt 0 unless
        :meth:`using_prompt` picked another)."""
        return self.prompts[self._prompt_index]

    @contextmanager
    def using_prompt(self, index: int):
        """Within the block, :attr:`active_prompt` is prompt ``index`` (strategies run per prompt)."""
        if not 0 <= index < self.num_prompts:
            raise IndexError(f"prompt {index} of {self.num_prompts}")
        previous, self._prompt_index = self._prompt_index, index
        try:
            yield self
        finally:
            self._prompt_index = previous

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
        the file (one clear error, never an unpickled object). The module ends where its pair was
        placed (``pair_device``, default ``auto``): Lightning alone would move it to wherever the
        checkpoint's tensors were saved, and the first forward would then drag the pair there."""
        run_files.read_checkpoint(checkpoint_path)
        kwargs.setdefault("weights_only", True)
        module = super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        return module.to(module.pair.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_same_pair(checkpoint.get("hyper_parameters") or {}, self.hparams, "the checkpoint")
        saved = checkpoint.get("state_dict", {}).get("soft_prompt")
        if saved is not None and saved.shape != self.soft_prompt.shape:
            raise ModelLoadError(
                f"the checkpoint's soft prompt has shape {tuple(saved.shape)} (virtual tokens, "
                f"hidden size) but this run needs {tuple(self.soft_prompt.shape)}: it comes from "
                "another model pair, prompt length or number of prompts; resume with a checkpoint "
                "of this pair, training.num_soft_prompt_tokens and training.num_prompts, or drop "
                "ckpt_path to start fresh"
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
            prompt = prompt.to(embeds.device, embeds.dtype)  # a prompt read from a file: CPU
            if prompt.dim() == 3:  # K prompts: the batch once per prompt, prompt k on rows k*B…
                embeds, mask = embeds.repeat(len(prompt), 1, 1), mask.repeat(len(prompt), 1)
                prompt_embeds = prompt.repeat_interleave(input_ids.shape[0], dim=0)
            else:
                prompt_embeds = prompt.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
            batch, n_virtual = embeds.shape[0], prompt.shape[-2]
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
        With several prompts (``[K, P, H]``, the trained ones when ``num_prompts > 1``): the mean
        over the prompts (see :meth:`prompt_divergences`).
        """
        prompt = self._prompt(use_prompt, prompt)
        if prompt is not None and prompt.dim() == 3:
            sums, counts = self.prompt_divergences(input_ids, attention_mask, prompt)
            return (sums.sum(-1) / counts.sum()).mean()
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

    def prompt_divergences(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt's divergence on each text, from one forward of each frozen model.

        The batch is replicated over the prompts inside that forward (row ``k*B + b`` is text
        ``b`` after prompt ``k``), so K prompts cost one pass over a K-times larger batch, not K
        passes.

        Args:
            input_ids: ``[B, L]`` left-padded text.
            attention_mask: ``[B, L]``, 1 on real tokens.
            prompts: ``[K, P, H]`` (default: the trained prompts, :attr:`prompts`).

        Returns:
            ``(sums, counts)``: ``[K, B]`` summed per-token divergence of each text under each
            prompt, and ``[B]`` its real-token count. ``sums[k].sum() / counts.sum()`` is prompt
            ``k``'s token-weighted mean (what :meth:`divergence` gives for that prompt alone);
            ``sums / counts`` its per-text profile.
        """
        self._sync_pair_device()
        prompts = self.prompts if prompts is None else prompts
        k, batch = prompts.shape[0], input_ids.shape[0]
        mask = attention_mask.bool()
        replicated = mask.repeat(k, 1)
        models = (self.pair.model_1, self.pair.model_2)
        if self.fused_head:
            hidden_1, hidden_2 = (
                self._text_hidden_states(m, input_ids, attention_mask, prompts) for m in models
            )
            values = chunked_head_divergences(
                hidden_1,
                hidden_2,
                replicated,
                models[0].get_output_embeddings(),
                models[1].get_output_embeddings(),
                self.divergence_fn,
                self.pair.vocab_size,
            )
            rows = replicated.nonzero()[:, 0]
            sums = values.new_zeros(k * batch).index_add(0, rows, values)
        else:
            logits_1, logits_2 = (
                self._model_logits(m, input_ids, attention_mask, prompts) for m in models
            )
            per_position = self.divergence_fn(logits_1, logits_2)
            sums = torch.where(replicated, per_position, torch.zeros_like(per_position)).sum(-1)
        return sums.view(k, batch), mask.sum(-1).to(sums.dtype)

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
        prompt = self.active_prompt.detach() if use_prompt else None
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
        if self.num_prompts > 1:
            return self._several_prompts_step(batch, batch_idx)
        divergence = self.divergence(batch["input_ids"], batch["attention_mask"])
        if self.hparams.get("on_policy_weight", 0.0) > 0:
            on_policy = self.on_policy_divergence(batch["input_ids"], batch["attention_mask"])
            self.log("train/on_policy_divergence", on_policy, batch_size=len(batch["input_ids"]))
            divergence = divergence + self.hparams.on_policy_weight * on_policy
        scale, logged, _ = self._data_parallel_scale(divergence, batch["attention_mask"])
        self._check_finite(logged, batch_idx)
        self.log("train/divergence", logged, prog_bar=True, batch_size=len(batch["input_ids"]))
        return -divergence * scale

    def _several_prompts_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """K prompts: ``-mean_k D_k + diversity_weight * sg(mean_k D_k) * diversity_penalty``
        of their per-text profiles, from one forward of each frozen model
        (:meth:`prompt_divergences`). The penalty is scale-free; multiplied by the (constant)
        mean divergence, both terms scale alike, so one ``diversity_weight`` means the same for
        KL and the bounded JS, and for pairs that differ a lot or little."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        sums, counts = self.prompt_divergences(ids, mask)
        per_prompt = sums.sum(-1) / counts.sum()
        divergence = per_prompt.mean()
        penalty = diversity_penalty(sums / counts)
        scale, logged, _ = self._data_parallel_scale(divergence, mask)
        self._check_finite(logged, batch_idx)
        self.log("train/divergence", logged, prog_bar=True, batch_size=len(ids))
        for k, value in enumerate(per_prompt.detach()):
            _, value, _ = self._data_parallel_scale(value, mask)  # the global batch's, as logged
            self.log(f"train/divergence_prompt_{k}", value, batch_size=len(ids))
        self.log("train/diversity_penalty", penalty.detach(), batch_size=len(ids))
        weight = self._hparam("diversity_weight") * logged.detach()
        return -divergence * scale + weight * penalty

    def _hparam(self, name: str):
        """Hyperparameter ``name``; when the hparams lack it (saved before the option existed),
        the constructor's default: the signature is its one source."""
        if name in self.hparams:
            return self.hparams[name]
        return inspect.signature(type(self).__init__).parameters[name].default

    def _check_finite(self, logged: torch.Tensor, batch_idx: int) -> None:
        # The global mean: a NaN on any rank stops every rank here, instead of leaving the others
        # waiting in the next collective.
        if not torch.isfinite(logged):
            raise DivergenceError(
                f"the divergence became {logged.item()} at training batch {batch_idx}: lower "
                "training.learning_rate, use model_pair.torch_dtype=float32, or keep "
                f"training.norm_constraint=true; {self._last_checkpoint_note()}"
            )

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
        """Both divergences of the global validation batch (each rank scores its own slice).

        With several prompts, ``val/divergence`` is their mean (what training maximises, before
        the diversity term) and ``val/divergence_prompt_K`` each prompt's own.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.num_prompts > 1:
            sums, counts = self.prompt_divergences(ids, mask)
            per_prompt = sums.sum(-1) / counts.sum()
            for k, value in enumerate(per_prompt):
                _, value, size = self._data_parallel_scale(value, mask)
                self.log(f"val/divergence_prompt_{k}", value, batch_size=size, sync_dist=True)
            divergence = per_prompt.mean()
        else:
            divergence = self.divergence(ids, mask)
        _, with_prompt, size = self._data_parallel_scale(divergence, mask)
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

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """``training.gradient_clip_val``: with several prompts (``[K, P, H]``) and clipping by
        norm, each prompt's gradient norm is clipped on its own, as if it were trained alone (one
        norm over all K would let one prompt's large gradient shrink every other's step).
        One prompt, or clipping by value: Lightning's clipping."""
        grad = self.soft_prompt.grad
        by_norm = gradient_clip_algorithm is None or gradient_clip_algorithm == "norm"
        if self.soft_prompt.dim() == 3 and gradient_clip_val and by_norm and grad is not None:
            norms = grad.detach().flatten(1).float().norm(dim=1)  # [K]
            # torch.nn.utils.clip_grad_norm_'s coefficient, per prompt.
            factor = (gradient_clip_val / (norms + 1e-6)).clamp(max=1.0)
            grad.mul_(factor.to(grad.dtype)[:, None, None])
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

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
        the same embeddings this module trained. With ``num_prompts = K > 1``: one such adapter
        per prompt, ``directory/prompt_0`` … ``prompt_{K-1}`` (each with ``prompt_index`` in its
        ``soft_prompting.json``), and the run's ``soft_prompting.json`` in ``directory`` itself.
        """
        directory = Path(directory)
        hparams = {k: v for k, v in self.hparams.items()}
        if self.num_prompts == 1:
            return self._write_adapter(directory, self.soft_prompt, hparams)
        for k in range(self.num_prompts):
            self._write_adapter(
                directory / f"prompt_{k}", self.prompts[k], hparams | {"prompt_index": k}
            )
        run_files.write_text(
            directory / "soft_prompting.json", json.dumps(hparams, indent=2, default=str)
        )
        return directory

    def _write_adapter(self, directory: Path, prompt: torch.Tensor, hparams: dict) -> Path:
        """One ``[P, H]`` prompt as a PEFT prompt-tuning adapter in ``directory``."""
        from peft import PromptTuningConfig, TaskType

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
        weights = prompt.detach().float().cpu().contiguous()
        hparams = json.dumps(hparams, indent=2, default=str)
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
