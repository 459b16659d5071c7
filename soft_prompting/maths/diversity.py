"""How much several soft prompts find the *same* difference: the diversity term of
``training.num_prompts > 1``.

Each prompt ``k`` has a per-text divergence profile ``d_k`` over the batch (``[K, B]``, the pair's
mean per-token divergence on each text with prompt ``k`` prepended). A behaviour of model_2 shows on
some texts and not on others (wrong sums on arithmetic questions, "i do not know" on chemistry), so
two prompts that exploit the same behaviour light up the same texts, and two that exploit different
ones light up different texts.

The measure is the *co-activation* of two profiles, ``mean_b(r_k(b) r_j(b)) - 1`` with
``r_k = d_k / mean(d_k)`` each text's divergence relative to the prompt's batch mean; equal to
``cov(d_k, d_j) / (mean(d_k) mean(d_j))``. It is 0 for unrelated profiles (and for a prompt whose
divergence is the same on every text: it singles out no behaviour), positive when the two prompts
peak on the same texts, negative when they split the texts between them. Why this one:

- it is scale-free in each prompt (``d_k -> c d_k`` leaves it unchanged), so the term never asks a
  prompt to lower its overall divergence, only to spend it on other texts; the mean-divergence
  objective keeps its meaning;
- unlike a correlation or a cosine similarity it has no stationary point where two profiles are
  equal, so it can push apart two prompts that found the same difference (a similarity that is
  maximal at equality has a zero gradient there);
- it needs only the per-text divergences the objective computes anyway, not the ``[V]`` shifts of
  the next-token distributions (which the chunked lm-head divergence never materialises).

:func:`diversity_penalty` is *ordered* (deflation, as in finding principal components one after
another, but all trained at once): prompt ``k`` is penalised for its co-activation with prompts
``0 … k-1``, whose profiles are held fixed (no gradient flows into them from this term). A
symmetric penalty gives two equal prompts equal gradients, so two prompts that met on the same
difference would stay together forever; the ordered one moves the later prompt away. Prompt 0's
objective is exactly a single prompt's, and only positive co-activation is penalised (a prompt is
never rewarded for avoiding another prompt's texts beyond not sharing them).

Shapes: ``profiles`` ``[K, B]``, non-negative (divergences); results are fp32 unless the input is
float64.
"""

from __future__ import annotations

import torch


def co_activation(profiles: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``[K, K]`` co-activations ``mean_b(r_i(b) r_j(b)) - 1`` of every pair of profiles.

    Args:
        profiles: ``[K, B]`` per-text divergences, one row per prompt.
        eps: floor of a row's mean (a prompt with no divergence at all).

    Returns:
        ``[K, K]`` symmetric; 0 where two profiles are unrelated, positive where they peak on the
        same texts.
    """
    profiles = profiles if profiles.dtype == torch.float64 else profiles.float()
    relative = profiles / profiles.mean(-1, keepdim=True).clamp(min=eps)
    return relative @ relative.T / profiles.shape[-1] - 1


def diversity_penalty(profiles: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Ordered (deflation) penalty: mean over ``k >= 1`` of the mean over ``j < k`` of
    ``max(0, co_activation(d_k, stop_gradient(d_j)))``.

    Args:
        profiles: ``[K, B]`` per-text divergences (``K >= 1``).
        eps: as in :func:`co_activation`.

    Returns:
        A scalar, 0 for a single prompt; its gradient reaches row ``k`` only through its own
        co-activations with the rows before it (row 0 gets none).
    """
    profiles = profiles if profiles.dtype == torch.float64 else profiles.float()
    k = profiles.shape[0]
    if k < 2:
        return profiles.sum() * 0
    relative = profiles / profiles.mean(-1, keepdim=True).clamp(min=eps)
    # Row k against the rows before it, held fixed: [K, K], only j < k used.
    pairwise = relative @ relative.detach().T / profiles.shape[-1] - 1
    earlier = torch.ones(k, k, dtype=torch.bool, device=profiles.device).tril(-1)
    per_prompt = (pairwise.clamp(min=0) * earlier).sum(-1)[1:] / earlier.sum(-1)[1:]
    return per_prompt.mean()
