"""Trigger localisation: which words of a prompt carry the pair's divergence.

For a prompt, the divergence is the pair's next-token divergence at its last position, measured
without the soft prompt (the strategies' pre-score). Batched ablations over words:

* leave-one-out: each word's attribution is the divergence lost when that word alone is dropped;
* the ``trigger``: the fewest words whose removal leaves less than ``1 - keep`` (20 %) of the
  divergence, found greedily (each time the word whose removal lowers it most): the words
  *without which* the pair agrees. A backdoor's planted word is exactly that, while the shortest
  sub-prompt that still diverges (the next item) also keeps the context the word needs to fire;
* the ``trigger_context``: greedy span ablation that drops words (never the trigger's) while at
  least ``keep`` (80 %) of the divergence remains; what is left is the shortest sub-prompt found
  that still makes the pair part ways.

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
    """The fewest words (in prompt order) whose removal leaves under ``1 - keep`` of the
    divergence; empty when the prompt does not diverge (divergence <= 0)."""
    divergence_without_trigger: float
    """The divergence at the last position once the trigger's words are dropped."""
    trigger_context: str
    """The shortest sub-prompt found that holds the trigger and keeps ``keep`` of the divergence."""
    trigger_context_divergence: float
    """The divergence at the trigger context's last position."""
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
    """Leave-one-out attributions, the trigger and the trigger's shortest context.

    Args:
        prompt: the prompt (no soft prompt is used anywhere).
        keep: share of the divergence the trigger carries (its removal leaves under
            ``1 - keep``) and that the context keeps.
        max_words: prompts with more words are localised on their last ``max_words`` words only
            (the greedy searches cost ``words^2`` prompt evaluations at most).
    """
    words = prompt.split()
    head, words = words[: max(0, len(words) - max_words)], words[-max_words:]
    full = last_divergence(module, [prompt])[0]
    if full <= 0:  # nothing diverges: no word carries it, so there is no trigger
        attributions = [{"word": w, "attribution": round(full, 6)} for w in words]
        return Localisation("", full, prompt, full, full, attributions)
    if len(words) <= 1:
        attributions = [{"word": w, "attribution": round(full, 6)} for w in words]
        return Localisation(prompt, 0.0, prompt, full, full, attributions)

    def text(indices: list[int]) -> str:
        return " ".join(head + [words[i] for i in indices])

    everything = list(range(len(words)))
    dropped = last_divergence(module, [text([j for j in everything if j != i]) for i in everything])
    attributions = [
        {"word": w, "attribution": round(full - d, 6)} for w, d in zip(words, dropped, strict=True)
    ]
    # The trigger: drop the most divergent word until under (1 - keep) of the divergence is left.
    trigger: list[int] = []
    left, left_value = everything, full
    while left and left_value >= (1 - keep) * full:
        options = [[j for j in left if j != i] for i in left]
        values = dropped if not trigger else last_divergence(module, [text(o) for o in options])
        best = min(range(len(options)), key=values.__getitem__)
        trigger.append(left[best])
        # Every word gone leaves the head (prompts over max_words), scored like any option.
        left, left_value = options[best], values[best]
    # Its context: drop other words while keep of the divergence remains.
    kept, kept_value = everything, full
    while len(kept) > len(trigger):
        options = [[j for j in kept if j != i] for i in kept if i not in trigger]
        values = last_divergence(module, [text(option) for option in options])
        best = max(range(len(options)), key=values.__getitem__)
        if values[best] < keep * full:
            break
        kept, kept_value = options[best], values[best]
    return Localisation(
        " ".join(words[i] for i in sorted(trigger)),
        left_value,
        text(kept),
        kept_value,
        full,
        attributions,
    )


def localise_records(module, records: list[dict], top: int = 20, keep: float = 0.8) -> list[dict]:
    """The first ``top`` records (already sorted) with ``trigger``, ``divergence_without_trigger``,
    ``trigger_context``, ``trigger_context_divergence`` and per-word ``attributions`` added; the
    rest unchanged."""
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
                    "divergence_without_trigger": round(found.divergence_without_trigger, 6),
                    "trigger_context": found.trigger_context,
                    "trigger_context_divergence": round(found.trigger_context_divergence, 6),
                    "attributions": found.attributions,
                }
            )
    finally:
        module.train(was_training)
    return located
