"""Scoring prompts without any soft prompt: both models continue each prompt, and the pair's
disagreement on those continuations becomes one record of the divergent dataset.

Per prompt, ``num_generations_per_prompt`` continuation *pairs* are sampled (KV-cached, batched,
left padded) with **common random numbers**: at each step both models draw their next token by the
Gumbel-max trick from their own temperature/top-p distribution with the *same* Gumbel noise
(per sample and position). Identical models therefore write identical text at any temperature, and
two models part ways only where their distributions really differ (temperature 0 is greedy).

Every log-probability is then taken teacher-forced, the same way for both models, on both
continuations: model_1's continuation ``x`` and model_2's ``y``. The position metrics are on ``x``.

Record schema (``divergent_dataset.jsonl`` / ``.pt``)::

    prompt, generation_1, generation_2, category, source,
    metrics: kl_divergence            mean per-token KL(p1 || p2) on model_1's continuation
             token_disagreement_rate  share of those positions where the argmax tokens differ
             vocab_jaccard_similarity Jaccard of the two generations' token sets (special tokens
                                      such as the end of sequence left out, as in the text)
             disagreement_positions   {first, last, count, length} of the shown continuation
             reliability              share of sampled pairs whose two generations differ
             kl_divergence_std        spread of the per-sample KL
    paired_samples: llr_gap           per sample pair, LLR(x) - LLR(y), where LLR(s) is the mean
                                      per-token log p1(s) - log p2(s) (nats/token, temperature 1)
                    kl_divergence     per sample, the KL of ``metrics.kl_divergence``

``kl_divergence``, ``token_disagreement_rate``, ``vocab_jaccard_similarity`` and ``reliability`` are
means over the sampled pairs; ``generation_1``/``generation_2`` and ``disagreement_positions`` show
the first pair. ``llr_gap`` is what :mod:`soft_prompting.maths.significance` tests: its expectation
is KL(p1||p2) + KL(p2||p1) over continuations (per token), and it is exactly 0 for identical models.

Sampling noise is drawn from a generator seeded by ``(seed, stream, batch offset)``: the dataset
(``stream="select"``) and the evaluation (``stream="confirm"``) never share samples.
"""

from __future__ import annotations

import functools
import inspect
import logging
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from soft_prompting.maths.divergence import (
    disagreement_positions,
    forward_kl,
    token_disagreement_rate,
    vocab_jaccard_similarity,
)
from soft_prompting.maths.significance import sequence_log_likelihood_ratio
from soft_prompting.pair.loading import ModelPair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """How continuations are sampled (a subset of :class:`~soft_prompting.config.GenerationConfig`)."""

    max_length: int = 24
    num_generations_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16
    static_cache: bool | None = None
    """Decode over a key/value cache allocated once for the whole continuation (no copy of the
    cache per new token); None: on CUDA, where the copies cost, and not on the CPU."""

    def __post_init__(self) -> None:
        # transformers' warpers reject an int temperature (``temperature=1``): store floats.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @classmethod
    def from_config(cls, generation) -> SamplingSettings:
        """The sampling part of a :class:`~soft_prompting.config.GenerationConfig`."""
        return cls(
            generation.max_length,
            generation.num_generations_per_prompt,
            generation.temperature,
            generation.top_p,
            generation.batch_size,
        )


@dataclass
class Continuations:
    """``k`` sampled continuations of each of ``N`` prompts, rows ordered prompt-major."""

    tokens: torch.Tensor
    """``[N*k, T]`` new tokens (pad after the end of sequence)."""
    mask: torch.Tensor
    """``[N*k, T]`` True up to and including the end-of-sequence token."""


def continuation_mask(tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """True on each row's tokens up to and including its first end-of-sequence token."""
    if eos_token_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = tokens == eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos


def noise_seed(seed: int, stream: str, offset: int) -> int:
    """Seed of the sampling noise of one batch: distinct ``stream`` names never share noise."""
    entropy = [seed, zlib.crc32(stream.encode()), offset]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def paired_generate(
    pair: ModelPair, prompts: list[str], settings: SamplingSettings, seed: int
) -> tuple[Continuations, Continuations]:
    """Both models continue each prompt ``num_generations_per_prompt`` times, with common noise.

    At step ``t`` of sample row ``r`` both models pick ``argmax(log q_m + g[r, t])``, where
    ``q_m`` is model ``m``'s temperature/top-p distribution and ``g`` one shared Gumbel draw
    (Gumbel-max: each model's marginal is exactly ``q_m``). Temperature 0 is greedy, noise-free.

    Returns:
        model_1's and model_2's continuations.
    """
    tokenizer = pair.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(pair.device)
    k, vocab = settings.num_generations_per_prompt, pair.vocab_size
    input_ids = batch["input_ids"].repeat_interleave(k, dim=0)
    prompt_mask = batch["attention_mask"].repeat_interleave(k, dim=0)
    rows = input_ids.shape[0]
    warpers = []
    if settings.temperature > 0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(settings.top_p))
    # The noise is drawn where the pair runs: on a GPU a host draw (rows × vocab per step) and its
    # copy would cost more than the decoding step. The CPU draws are the same as ever.
    generator = torch.Generator(device=pair.device).manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    first = {"input_ids": input_ids, "attention_mask": prompt_mask, "position_ids": position_ids}
    new_tokens = settings.max_length if static_by_default(pair, settings.static_cache) else None
    states = [
        {
            # logits_to_keep=0 (every position): bit-identical to the scoring before the decoder
            "decoder": CachedDecoder(
                model, first, vocab, logits_to_keep=0, max_new_tokens=new_tokens
            ),
            "tokens": [],
            "done": torch.zeros(rows, dtype=torch.bool, device=pair.device),
        }
        for model in (pair.model_1, pair.model_2)
    ]
    for step in range(settings.max_length):
        gumbel = None
        if warpers:
            uniform = torch.rand(rows, vocab, generator=generator, device=pair.device)
            gumbel = -(-uniform.clamp(1e-20, 1.0).log()).log()
        for state in states:
            scores = state["decoder"].logits
            if step == 0 and eos is not None and eos < vocab:  # at least one new token
                scores = scores.clone()
                scores[:, eos] = -float("inf")
            if gumbel is not None:
                for warper in warpers:
                    scores = warper(None, scores)
                choice = (scores.log_softmax(-1) + gumbel).argmax(-1)
            else:
                choice = scores.argmax(-1)
            choice = torch.where(state["done"], torch.full_like(choice, pad), choice)
            state["tokens"].append(choice)
            if eos is not None:
                state["done"] = state["done"] | (choice == eos)
        if step == settings.max_length - 1 or all(bool(s["done"].all()) for s in states):
            break
        for state in states:
            state["decoder"].advance(state["tokens"][-1])
    results = []
    for state in states:
        tokens = torch.stack(state["tokens"], dim=1)
        results.append(Continuations(tokens, continuation_mask(tokens, eos)))
    return results[0], results[1]


class CachedDecoder:
    """One model continuing a batch a token at a time over its key/value cache.

    Args:
        model: a causal LM.
        inputs: the first forward's arguments: ``input_ids`` or ``inputs_embeds`` (e.g. behind a
            soft prompt), ``attention_mask`` and ``position_ids``, all ``[B, L]``-shaped.
        vocab_size: real vocabulary (logits beyond it, embedding padding, are dropped).
        logits_to_keep: positions whose logits the first forward computes (0: all of them).
        max_new_tokens: given, the cache is allocated once for ``L + max_new_tokens`` positions
            (transformers' ``StaticCache``; each step writes its keys and values in place) where
            this transformers and model allow it; None: a cache that grows by a copy per step.

    Attributes:
        logits: ``[B, V]`` fp32, the next token's logits.
        static: whether the cache was allocated once.
    """

    def __init__(
        self,
        model,
        inputs: dict,
        vocab_size: int,
        logits_to_keep: int = 1,
        max_new_tokens: int | None = None,
    ) -> None:
        self.model, self.vocab_size = model, vocab_size
        self._cache_name = _cache_argument(model)
        self.mask = inputs["attention_mask"]
        self.position = inputs["position_ids"][:, -1]
        length = self.mask.shape[1]
        cache = None if max_new_tokens is None else static_cache(model, length + max_new_tokens)
        self.static = cache is not None
        # transformers before 5 writes a static cache at the positions it is given; 5.x counts
        self._positions = (
            self.static and "cache_position" in inspect.signature(model.forward).parameters
        )
        extra = {self._cache_name: cache} if self.static else {}
        if self._positions:
            self.cache_position = torch.arange(length, device=self.mask.device)
            extra["cache_position"] = self.cache_position
        first = inputs | {"use_cache": True, "logits_to_keep": logits_to_keep}
        try:
            self._read(model(**first, **extra))
        except Exception as err:
            if not self.static:
                raise
            # A model whose own cache or code takes no static cache: the growing one, said once.
            _warn_once(f"{type(model).__name__} decodes over a growing key/value cache: {err}")
            self.static = self._positions = False
            self._read(model(**first))

    def advance(self, tokens: torch.Tensor) -> None:
        """Feeds ``tokens`` (``[B]``, one per row) after everything so far."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.position = self.position + 1
        extra = {self._cache_name: self.cache}
        if self._positions:
            self.cache_position = self.cache_position[-1:] + 1
            extra["cache_position"] = self.cache_position
        self._read(
            self.model(
                input_ids=tokens[:, None],
                attention_mask=self.mask,
                position_ids=self.position[:, None],
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        )

    def _read(self, out) -> None:
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        self.logits = out.logits[:, -1, : self.vocab_size].float()


def static_by_default(pair: ModelPair, setting: bool | None = None) -> bool:
    """Whether decoding allocates its key/value cache once (:attr:`SamplingSettings.static_cache`;
    None: on CUDA, where a growing cache's per-token copies cost, and not elsewhere, where runs
    repeat their earlier records). Quantised and split pairs decode over a growing cache anyway."""
    return pair.device.type == "cuda" if setting is None else setting


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def static_cache(model, length: int):
    """transformers' ``StaticCache`` of ``length`` positions for ``model``, or None where it
    cannot take one: a model dispatched over devices, or a transformers whose ``StaticCache`` is
    built otherwise (it then decodes over a growing cache)."""
    if hasattr(model, "hf_device_map"):
        return None
    try:
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=length)
    except (ImportError, TypeError, ValueError):
        return None


def _cache_argument(model) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def teacher_forced_logits(
    model, pair: ModelPair, prompts: list[str], tokens: torch.Tensor, repeats: int
) -> torch.Tensor:
    """``model``'s logits for each continuation token, in one forward over prompt + continuation.

    Returns:
        ``[N*repeats, T, V]`` fp32, aligned with ``tokens``.
    """
    tokenizer = pair.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(pair.device)
    input_ids = batch["input_ids"].repeat_interleave(repeats, dim=0)
    prompt_mask = batch["attention_mask"].repeat_interleave(repeats, dim=0)
    full_ids = torch.cat([input_ids, tokens], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(tokens)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    n_new = tokens.shape[1]
    out = model(
        input_ids=full_ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=n_new + 1,
    )
    # The logit at the last prompt token predicts continuation token 0, and so on.
    return out.logits[:, :n_new].float()[..., : pair.vocab_size]


def _token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log-probability of each token under ``[B, T, V]`` logits (temperature 1)."""
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def score_prompts(
    pair: ModelPair,
    prompts: list[str],
    settings: SamplingSettings,
    seed: int = 0,
    progress: bool = True,
    stream: str = "select",
) -> list[dict]:
    """Generate with both models from each bare prompt (paired) and measure where they disagree.

    Args:
        stream: names the noise stream; scoring the same prompt with another stream (or seed)
            draws fresh samples (the evaluation confirms on ``"confirm"``).

    Returns:
        One ``{"prompt", "generation_1", "generation_2", "metrics", "paired_samples"}`` dict per
        prompt, in order.
    """
    records: list[dict] = []
    k = settings.num_generations_per_prompt
    special = set(pair.tokenizer.all_special_ids)
    batches = range(0, len(prompts), settings.batch_size)
    for start in tqdm(batches, desc="scoring prompts", disable=not progress):
        chunk = prompts[start : start + settings.batch_size]
        gen_1, gen_2 = paired_generate(pair, chunk, settings, noise_seed(seed, stream, start))
        # Every log-probability teacher-forced, by the same code for both models, so identical
        # models give bitwise-identical numbers (a KV-cached pass rounds differently).
        logits_1 = teacher_forced_logits(pair.model_1, pair, chunk, gen_1.tokens, k)
        logits_2 = teacher_forced_logits(pair.model_2, pair, chunk, gen_1.tokens, k)
        # On model_2's continuations only the tokens' log-probabilities are needed: each
        # [rows, T, V] logits tensor is dropped as soon as they are read (GPU memory).
        on_y_1, on_y_2 = (
            _token_log_probs(
                teacher_forced_logits(model, pair, chunk, gen_2.tokens, k), gen_2.tokens
            )
            for model in (pair.model_1, pair.model_2)
        )
        llr_x = sequence_log_likelihood_ratio(
            _token_log_probs(logits_1, gen_1.tokens),
            _token_log_probs(logits_2, gen_1.tokens),
            gen_1.mask,
        )
        llr_y = sequence_log_likelihood_ratio(on_y_1, on_y_2, gen_2.mask)
        llr_gap = (llr_x - llr_y).double()
        kl = forward_kl(logits_1, logits_2)
        kl = torch.where(gen_1.mask, kl, 0).sum(-1) / gen_1.mask.sum(-1).clamp(min=1)
        disagreement = token_disagreement_rate(logits_1, logits_2, gen_1.mask)
        positions = disagreement_positions(logits_1, logits_2, gen_1.mask)
        for i, prompt in enumerate(chunk):
            rows = range(i * k, (i + 1) * k)
            ids_1 = [_ids(gen_1, r) for r in rows]
            ids_2 = [_ids(gen_2, r) for r in rows]
            # Over the words shown, as decoded: the end-of-sequence token both share is no word.
            jaccard = [
                vocab_jaccard_similarity(
                    [t for t in a if t not in special], [t for t in b if t not in special]
                )
                for a, b in zip(ids_1, ids_2, strict=True)
            ]
            sample_kl = kl[rows.start : rows.stop]
            records.append(
                {
                    "prompt": prompt,
                    "generation_1": _decode(pair, ids_1[0]),
                    "generation_2": _decode(pair, ids_2[0]),
                    "metrics": {
                        "kl_divergence": float(sample_kl.mean()),
                        "token_disagreement_rate": float(
                            disagreement[rows.start : rows.stop].mean()
                        ),
                        "vocab_jaccard_similarity": sum(jaccard) / k,
                        "disagreement_positions": positions[rows.start],
                        # Token ids, not decoded text: two different generations can decode alike.
                        "reliability": sum(a != b for a, b in zip(ids_1, ids_2, strict=True)) / k,
                        "kl_divergence_std": float(sample_kl.std()) if k > 1 else 0.0,
                    },
                    "paired_samples": {
                        "llr_gap": llr_gap[rows.start : rows.stop].tolist(),
                        "kl_divergence": sample_kl.double().tolist(),
                    },
                }
            )
    return records


def _ids(continuations: Continuations, row: int) -> list[int]:
    return continuations.tokens[row][continuations.mask[row]].tolist()


def _decode(pair: ModelPair, ids: list[int]) -> str:
    return pair.tokenizer.decode(ids, skip_special_tokens=True).strip()
