"""Trigger localisation: which words of a prompt carry the pair's divergence.

For a prompt, the divergence is the pair's next-token divergence at its last position, measured
without the soft prompt (the strategies' pre-score). Two batched ablations:

* leave-one-out: each word's attribution is the divergence lost when that word alone is dropped;
* greedy span ablation: words are dropped one at a time, each time the one whose removal keeps
  the most divergence, while at least ``keep`` (80 %) of the full prompt's divergence remains.
  What is left is the shortest sub-prompt found that still makes the pair part ways: the
  ``trigger``.

Words are whitespace-separated pieces, so a trigger reads as text whatever the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soft_prompting.hard_prompts.strategies import per_token_divergence


@dataclass(frozen=True)
class Localisation:
    """Where a prompt's divergence sits."""

    trigger: str
    """The shortest sub-prompt found keeping at least ``keep`` of the divergence."""
    trigger_divergence: float
    """The divergence at the trigger's last position."""
    divergence: float
    """The whole prompt's divergence at its last position."""
    attributions: list[dict]
    """Per word ``{"word", "attribution"}``: divergence lost when that word alone is dropped."""


def last_divergence(module, texts: list[str], batch_size: int = 32) -> list[float]:
    """The pair's divergence at each text's last position, no soft prompt (0 for empty text)."""
    values = [0.0] * len(texts)
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    measured = per_token_divergence(module, [texts[i] for i in nonempty], batch_size)
    for i, (_, divergence) in zip(nonempty, measured, strict=True):
        values[i] = float(divergence[-1])
    return values


@torch.no_grad()
def localise(module, prompt: str, keep: float = 0.8, max_words: int = 64) -> Localisation:
    """Leave-one-out attributions and the shortest sub-prompt keeping ``keep`` of the divergence.

    Args:
        prompt: the prompt (no soft prompt is used anywhere).
        keep: share of the full divergence the trigger must keep.
        max_words: prompts with more words are localised on their last ``max_words`` words only
            (the greedy search costs ``words^2`` prompt evaluations).
    """
    words = prompt.split()
    head, words = words[: max(0, len(words) - max_words)], words[-max_words:]
    full = last_divergence(module, [prompt])[0]
    if len(words) <= 1 or full <= 0:
        attributions = [{"word": w, "attribution": round(full, 6)} for w in words]
        return Localisation(prompt, full, full, attributions)

    def text(indices: list[int]) -> str:
        return " ".join(head + [words[i] for i in indices])

    everything = list(range(len(words)))
    dropped = last_divergence(module, [text([j for j in everything if j != i]) for i in everything])
    attributions = [
        {"word": w, "attribution": round(full - d, 6)} for w, d in zip(words, dropped, strict=True)
    ]
    kept, kept_value = everything, full
    while len(kept) > 1:
        options = [[j for j in kept if j != i] for i in kept]
        values = last_divergence(module, [text(option) for option in options])
        best = max(range(len(options)), key=values.__getitem__)
        if values[best] < keep * full:
            break
        kept, kept_value = options[best], values[best]
    return Localisation(text(kept), kept_value, full, attributions)


def localise_records(module, records: list[dict], top: int = 20, keep: float = 0.8) -> list[dict]:
    """The first ``top`` records (already sorted) with ``trigger``, ``trigger_divergence`` and
    per-word ``attributions`` added; the rest unchanged."""
    was_training = module.training
    module.eval()
    try:
        located = []
        for number, record in enumerate(records):
            if number >= top:
                located.append(record)
                continue
            found = localise(module, record["prompt"], keep)
            located.append(
                record
                | {
                    "trigger": found.trigger,
                    "trigger_divergence": round(found.trigger_divergence, 6),
                    "attributions": found.attributions,
                }
            )
    finally:
        module.train(was_training)
    return located
