"""Scoring prompts without any soft prompt: both models continue each prompt, and the pair's
disagreement on those continuations becomes one record of the divergent dataset.

Per prompt, ``num_generations_per_prompt`` continuation pairs are sampled (KV-cached, batched, left
padded). The position metrics are taken on model_1's continuation, teacher-forced: model_1's logits
come from ``generate(output_logits=True)`` and model_2 scores the same tokens in one forward pass.

Record schema (``divergent_dataset.jsonl`` / ``.pt``)::

    prompt, generation_1, generation_2, category, source,
    metrics: kl_divergence            mean per-token KL(p1 || p2) on model_1's continuation
             token_disagreement_rate  share of those positions where the argmax tokens differ
             vocab_jaccard_similarity Jaccard of the two generations' token sets
             disagreement_positions   {first, last, count, length} of the shown continuation
             reliability              share of sampled pairs whose two generations differ
             kl_divergence_std        spread of the per-sample KL

``kl_divergence``, ``token_disagreement_rate``, ``vocab_jaccard_similarity`` and ``reliability`` are
means over the sampled pairs; ``generation_1``/``generation_2`` and ``disagreement_positions`` show
the first pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from soft_prompting.maths.divergence import (
    disagreement_positions,
    forward_kl,
    token_disagreement_rate,
    vocab_jaccard_similarity,
)
from soft_prompting.pair.loading import ModelPair


@dataclass(frozen=True)
class SamplingSettings:
    """How continuations are sampled (a subset of :class:`~soft_prompting.config.GenerationConfig`)."""

    max_length: int = 24
    num_generations_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16

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
    logits: torch.Tensor | None
    """``[N*k, T, V]`` the generating model's raw logits at each new token (fp32)."""


def continuation_mask(tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """True on each row's tokens up to and including its first end-of-sequence token."""
    if eos_token_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = tokens == eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos


@torch.no_grad()
def generate(
    model, pair: ModelPair, prompts: list[str], settings: SamplingSettings, keep_logits: bool
) -> Continuations:
    """Sample ``num_generations_per_prompt`` continuations per prompt from ``model`` (no soft prompt)."""
    tokenizer = pair.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(pair.device)
    sample = settings.temperature > 0
    out = model.generate(
        **batch,
        max_new_tokens=settings.max_length,
        min_new_tokens=1,
        do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=0 if sample else None,
        num_return_sequences=settings.num_generations_per_prompt,
        output_logits=keep_logits,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokens = out.sequences[:, batch["input_ids"].shape[1] :]
    logits = None
    if keep_logits:
        logits = torch.stack(out.logits, dim=1).float()[..., : pair.vocab_size]
    return Continuations(tokens, continuation_mask(tokens, tokenizer.eos_token_id), logits)


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


def score_prompts(
    pair: ModelPair,
    prompts: list[str],
    settings: SamplingSettings,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Generate with both models from each bare prompt and measure where they disagree.

    Returns:
        One ``{"prompt", "generation_1", "generation_2", "metrics"}`` dict per prompt, in order.
    """
    records: list[dict] = []
    k = settings.num_generations_per_prompt
    batches = range(0, len(prompts), settings.batch_size)
    for start in tqdm(batches, desc="scoring prompts", disable=not progress):
        chunk = prompts[start : start + settings.batch_size]
        torch.manual_seed(seed + start)
        gen_1 = generate(pair.model_1, pair, chunk, settings, keep_logits=True)
        gen_2 = generate(pair.model_2, pair, chunk, settings, keep_logits=False)
        logits_2 = teacher_forced_logits(pair.model_2, pair, chunk, gen_1.tokens, k)
        kl = forward_kl(gen_1.logits, logits_2)
        kl = torch.where(gen_1.mask, kl, 0).sum(-1) / gen_1.mask.sum(-1).clamp(min=1)
        disagreement = token_disagreement_rate(gen_1.logits, logits_2, gen_1.mask)
        positions = disagreement_positions(gen_1.logits, logits_2, gen_1.mask)
        for i, prompt in enumerate(chunk):
            rows = range(i * k, (i + 1) * k)
            texts_1 = [_decode(pair, gen_1, r) for r in rows]
            texts_2 = [_decode(pair, gen_2, r) for r in rows]
            jaccard = [vocab_jaccard_similarity(_ids(gen_1, r), _ids(gen_2, r)) for r in rows]
            sample_kl = kl[rows.start : rows.stop]
            records.append(
                {
                    "prompt": prompt,
                    "generation_1": texts_1[0],
                    "generation_2": texts_2[0],
                    "metrics": {
                        "kl_divergence": float(sample_kl.mean()),
                        "token_disagreement_rate": float(
                            disagreement[rows.start : rows.stop].mean()
                        ),
                        "vocab_jaccard_similarity": sum(jaccard) / k,
                        "disagreement_positions": positions[rows.start],
                        "reliability": sum(a != b for a, b in zip(texts_1, texts_2, strict=True))
                        / k,
                        "kl_divergence_std": float(sample_kl.std()) if k > 1 else 0.0,
                    },
                }
            )
    return records


def _ids(continuations: Continuations, row: int) -> list[int]:
    return continuations.tokens[row][continuations.mask[row]].tolist()


def _decode(pair: ModelPair, continuations: Continuations, row: int) -> str:
    return pair.tokenizer.decode(_ids(continuations, row), skip_special_tokens=True).strip()
