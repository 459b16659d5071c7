"""Pure tensor maths: divergences between two models' next-token distributions, and the metrics
of the divergent dataset.

Every function takes logits (any float dtype) and works in fp32 from ``log_softmax``, so bf16 models
give the same divergence as fp32 ones up to their own rounding. Shapes: ``[..., V]`` logits give
``[...]`` per-position values; masks are ``[...]`` booleans, True where a position counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(dim=-1)


def forward_kl(logits_1: torch.Tensor, logits_2: torch.Tensor) -> torch.Tensor:
    """KL(p1 || p2) per position: how surprised model_2 is by model_1's distribution.

    Args:
        logits_1: ``[..., V]`` logits of model_1.
        logits_2: ``[..., V]`` logits of model_2.

    Returns:
        ``[...]`` fp32 divergences, in nats.
    """
    log_p1, log_p2 = _log_probs(logits_1), _log_probs(logits_2)
    return F.kl_div(log_p2, log_p1, reduction="none", log_target=True).sum(-1)


def reverse_kl(logits_1: torch.Tensor, logits_2: torch.Tensor) -> torch.Tensor:
    """KL(p2 || p1) per position. Shapes as in :func:`forward_kl`."""
    return forward_kl(logits_2, logits_1)


def jensen_shannon(logits_1: torch.Tensor, logits_2: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per position, bounded by log(2). Shapes as in :func:`forward_kl`."""
    log_p1, log_p2 = _log_probs(logits_1), _log_probs(logits_2)
    log_m = torch.logaddexp(log_p1, log_p2) - math.log(2.0)
    kl_1m = F.kl_div(log_m, log_p1, reduction="none", log_target=True).sum(-1)
    kl_2m = F.kl_div(log_m, log_p2, reduction="none", log_target=True).sum(-1)
    return 0.5 * (kl_1m + kl_2m)


DIVERGENCES: dict[str, Divergence] = {
    "kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": jensen_shannon,
}


def get_divergence(kind: str) -> Divergence:
    """The per-position divergence called ``kind`` (one of :data:`DIVERGENCES`)."""
    if kind not in DIVERGENCES:
        raise ValueError(
            f"unknown divergence {kind!r}: set training.divergence to one of {sorted(DIVERGENCES)}"
        )
    return DIVERGENCES[kind]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True (token-weighted).

    ``torch.where`` rather than a product, so a NaN at a masked-out position cannot leak in.
    Raises ``ValueError`` when no position counts, because a mean over nothing is not zero.
    """
    mask = mask.bool()
    count = mask.sum()
    if count.item() == 0:
        raise ValueError("no position to average over: every position is masked out")
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count


def token_disagreement_rate(
    logits_1: torch.Tensor, logits_2: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Fraction of masked-in positions where the two models' argmax tokens differ.

    Args:
        logits_1, logits_2: ``[B, T, V]``.
        mask: ``[B, T]``.

    Returns:
        ``[B]`` rates in [0, 1] (0 for a row with no position).
    """
    differs = (logits_1.argmax(-1) != logits_2.argmax(-1)) & mask.bool()
    return differs.sum(-1) / mask.bool().sum(-1).clamp(min=1)


def disagreement_positions(
    logits_1: torch.Tensor, logits_2: torch.Tensor, mask: torch.Tensor
) -> list[dict[str, int]]:
    """Where in each continuation the two models' argmax tokens differ.

    Args:
        logits_1, logits_2: ``[B, T, V]``; position ``t`` predicts continuation token ``t``.
        mask: ``[B, T]``, True on real continuation tokens (a prefix of each row).

    Returns:
        One dict per row: ``first`` (index of the first disagreement, -1 if none), ``last``
        (-1 if none), ``count`` (positions that disagree) and ``length`` (positions compared).
    """
    differs = (logits_1.argmax(-1) != logits_2.argmax(-1)) & mask.bool()
    rows = []
    for row_differs, row_mask in zip(differs, mask.bool(), strict=True):
        idx = row_differs.nonzero().flatten().tolist()
        rows.append(
            {
                "first": idx[0] if idx else -1,
                "last": idx[-1] if idx else -1,
                "count": len(idx),
                "length": int(row_mask.sum().item()),
            }
        )
    return rows


def vocab_jaccard_similarity(tokens_1: list[int], tokens_2: list[int]) -> float:
    """Jaccard similarity of the two generations' token sets (1.0 when both are empty)."""
    set_1, set_2 = set(tokens_1), set(tokens_2)
    union = set_1 | set_2
    return len(set_1 & set_2) / len(union) if union else 1.0
