"""The divergence of two frozen LM heads, taken a chunk of positions at a time.

The plain formulation builds both models' ``[B, T, V]`` logits, two fp32 log-softmaxes and their
gradients, all alive at once: for a 32k vocabulary that is most of a training step's memory and
much of its time. The lm_heads are frozen, so the only gradient needed is the one with respect to
the final hidden states. :func:`chunked_head_divergence` therefore computes, a chunk of positions
at a time, the logits, the divergence *and* its gradient with respect to that chunk's hidden
states, and keeps only those ``[M, H]`` gradients for the backward pass. The maths is the caller's
divergence function itself (run under autograd per chunk), so the value and the gradient are the
plain formulation's, up to the order of float summation.

Shapes: ``hidden_*`` ``[B, T, H]`` final (normed) hidden states at the text positions, ``mask``
``[B, T]`` True where a position counts; the result is the mean per-position divergence (a scalar).
"""

from __future__ import annotations

import torch

from soft_prompting.maths.divergence import Divergence


def chunk_rows_for(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Positions per chunk: measured best on CPU near 256 rows (cache-sized, still an efficient
    matmul); on a GPU, bigger chunks of ~32M logits (128 MB per fp32 tensor) keep it busy."""
    if torch.device(device).type == "cuda":
        return max(16, 2**25 // vocab_size)
    return min(256, max(16, 2**23 // vocab_size))


def chunked_head_divergence(
    hidden_1: torch.Tensor,
    hidden_2: torch.Tensor,
    mask: torch.Tensor,
    head_1: torch.nn.Module,
    head_2: torch.nn.Module,
    divergence_fn: Divergence,
    vocab_size: int,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean over the masked-in positions of ``divergence_fn(head_1(h_1), head_2(h_2))``.

    Args:
        hidden_1, hidden_2: ``[B, T, H]`` final hidden states of model_1 and model_2.
        mask: ``[B, T]``, True on the positions that count.
        head_1, head_2: the frozen lm_heads (``[..., H] -> [..., V']``, ``V' >= vocab_size``).
        divergence_fn: per-position divergence of two ``[..., V]`` logits (see ``divergence.py``).
        vocab_size: real vocabulary; logits beyond it (embedding padding) are dropped.
        chunk_rows: positions per chunk (default: :func:`chunk_rows_for`).

    Returns:
        A scalar fp32 tensor, differentiable with respect to ``hidden_1`` and ``hidden_2``.
    """
    mask = mask.bool()
    if not mask.any():
        raise ValueError("no position to average over: every position is masked out")
    chunk_rows = chunk_rows or chunk_rows_for(vocab_size, hidden_1.device)
    values = chunked_head_divergences(
        hidden_1, hidden_2, mask, head_1, head_2, divergence_fn, vocab_size, chunk_rows
    )
    # Summed a chunk at a time, in the order the chunks were computed (fp32 partial sums).
    total = sum(values[s : s + chunk_rows].sum() for s in range(0, values.shape[0], chunk_rows))
    return total / values.shape[0]


def chunked_head_divergences(
    hidden_1: torch.Tensor,
    hidden_2: torch.Tensor,
    mask: torch.Tensor,
    head_1: torch.nn.Module,
    head_2: torch.nn.Module,
    divergence_fn: Divergence,
    vocab_size: int,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The per-position divergences behind :func:`chunked_head_divergence`, not averaged.

    Each position's divergence depends only on that position's two hidden states, so the gradient
    of any weighted sum of them is the per-position gradients weighted the same way: the forward
    keeps the ``[M, H]`` per-position gradients (as the mean does) and the backward scales each by
    its own incoming gradient. Callers can then take per-prompt and per-text means.

    Args: as :func:`chunked_head_divergence`.

    Returns:
        ``[M]`` fp32 divergences of the masked-in positions, in ``mask.nonzero()`` order
        (row-major), differentiable with respect to ``hidden_1`` and ``hidden_2``.
    """
    mask = mask.bool()
    chunk_rows = chunk_rows or chunk_rows_for(vocab_size, hidden_1.device)
    needs_grad = torch.is_grad_enabled() and (hidden_1.requires_grad or hidden_2.requires_grad)
    if not needs_grad:
        rows_1, rows_2 = hidden_1[mask], hidden_2[mask]
        parts = [
            divergence_fn(
                head_1(rows_1[s : s + chunk_rows])[..., :vocab_size],
                head_2(rows_2[s : s + chunk_rows])[..., :vocab_size],
            ).float()
            for s in range(0, rows_1.shape[0], chunk_rows)
        ]
        return torch.cat(parts) if parts else rows_1.new_zeros(0, dtype=torch.float32)
    return _ChunkedHeadDivergences.apply(
        hidden_1, hidden_2, mask, head_1, head_2, divergence_fn, vocab_size, chunk_rows
    )


class _ChunkedHeadDivergences(torch.autograd.Function):
    """Forward computes the per-position values and gradients; backward weights the gradients."""

    @staticmethod
    def forward(
        ctx, hidden_1, hidden_2, mask, head_1, head_2, divergence_fn, vocab_size, chunk_rows
    ):
        rows_1, rows_2 = hidden_1.detach()[mask], hidden_2.detach()[mask]
        count = rows_1.shape[0]
        grads_1, grads_2 = torch.empty_like(rows_1), torch.empty_like(rows_2)
        values = torch.empty(count, dtype=torch.float32, device=rows_1.device)
        for start in range(0, count, chunk_rows):
            stop = start + chunk_rows
            with torch.enable_grad():
                chunk_1 = rows_1[start:stop].detach().requires_grad_()
                chunk_2 = rows_2[start:stop].detach().requires_grad_()
                chunk_values = divergence_fn(
                    head_1(chunk_1)[..., :vocab_size], head_2(chunk_2)[..., :vocab_size]
                )
                # Positions are independent: the gradient of the sum is each one's own gradient.
                grad_1, grad_2 = torch.autograd.grad(chunk_values.sum(), (chunk_1, chunk_2))
            grads_1[start:stop] = grad_1
            grads_2[start:stop] = grad_2
            values[start:stop] = chunk_values.detach().float()
        ctx.save_for_backward(grads_1, grads_2, mask)
        ctx.shapes = (hidden_1.shape, hidden_2.shape)
        return values

    @staticmethod
    def backward(ctx, grad_output):
        grads_1, grads_2, mask = ctx.saved_tensors
        outputs = []
        for grads, shape in zip((grads_1, grads_2), ctx.shapes, strict=True):
            full = grads.new_zeros(shape)
            full[mask] = (grads * grad_output[:, None]).to(grads.dtype)
            outputs.append(full)
        return outputs[0], outputs[1], None, None, None, None, None, None
