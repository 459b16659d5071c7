"""Pure tensor maths: which vocabulary rows a fine-tune moved (the white-box prior).

When both models of a pair expose input embeddings and output heads of the same shape, the rows of
the tokens the fine-tune was about move most: a planted trigger word is read in a new context
(its input row) and written far more often than before (its output row). Ranking tokens by how far
their rows moved recovered planted triggers in a public trojan-detection competition.

Shapes: weight matrices are ``[V, H]`` (one row per token); scores are ``[V]``.
"""

from __future__ import annotations

import torch


def row_shift(
    weight_1: torch.Tensor, weight_2: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """How far each token's row moved, in units of the matrix's typical move.

    Each row's Euclidean distance ``||w2[v] - w1[v]||`` divided by the root mean square of those
    distances over the rows: the scale of a matrix (embedding vs output head, a model's init) does
    not matter, so several matrices can be summed. An unchanged matrix gives zeros.

    Computed a chunk of rows at a time on ``weight_1``'s device (``weight_2``'s rows are brought
    there chunk by chunk): no fp32 copy of a whole ``[V, H]`` matrix is ever made.

    Args:
        weight_1: ``[V, H]`` rows of model_1 (any float dtype).
        weight_2: ``[V, H]`` the same matrix of model_2.
        chunk_rows: rows per chunk (default: about 16M elements, 64 MB of fp32, per chunk).

    Returns:
        ``[V]`` fp32 non-negative shifts on ``weight_1``'s device (mean square 1 unless every row
        is unchanged).
    """
    if weight_1.shape != weight_2.shape:
        raise ValueError(
            f"row_shift: shapes differ, {tuple(weight_1.shape)} vs {tuple(weight_2.shape)}"
        )
    rows, device = weight_1.shape[0], weight_1.device
    chunk_rows = chunk_rows or max(1, 2**24 // max(weight_1.shape[-1], 1))
    distance = torch.empty(rows, dtype=torch.float32, device=device)
    for start in range(0, rows, chunk_rows):
        stop = start + chunk_rows
        moved = weight_2[start:stop].to(device).float() - weight_1[start:stop].float()
        distance[start:stop] = moved.norm(dim=-1)
    scale = distance.square().mean().sqrt()
    if scale == 0:
        return distance
    return distance / scale


def changed_rows_score(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum of :func:`row_shift` over ``(model_1 matrix, model_2 matrix)`` pairs (``[V, H]`` each,
    the same ``V``): e.g. the input embeddings and the output heads, wherever they are. Each
    shift is computed on its matrices' device; only the ``[V]`` shifts come to the CPU.
    Returns ``[V]`` fp32 on the CPU."""
    if not pairs:
        raise ValueError("changed_rows_score: no matrices to compare")
    return torch.stack([row_shift(a, b).cpu() for a, b in pairs]).sum(0)
