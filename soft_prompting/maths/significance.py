"""Pure maths of the evidence: per-sample likelihood ratios, the per-prompt test, false-discovery
control and bootstrap confidence intervals (torch, numpy and ``scipy.stats`` only).

The per-prompt test (see docs/HARD_PROMPTS.md, "Significance"): for sample pair ``i`` of a prompt,
``x_i`` is model_1's continuation and ``y_i`` model_2's, drawn with common random numbers, and

    d_i = LLR(x_i) - LLR(y_i),   LLR(s) = mean over the tokens of s of log p1(s_t) - log p2(s_t).

Under the null "the two models' continuation distributions are the same at this prompt", ``x_i``
and ``y_i`` are exchangeable, so ``d_i`` is symmetric about 0 (with common random numbers it is
exactly 0); under any alternative ``E[d_i]`` is a symmetrised KL (Jeffreys) divergence, > 0. The
test is the exact one-sided sign-flip permutation test of ``mean(d) > 0``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

MAX_EXACT_SAMPLES = 16
"""Up to this many samples the sign-flip test enumerates all 2^k sign patterns (exact p)."""


def sequence_log_likelihood_ratio(
    log_p1: torch.Tensor, log_p2: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean per-token log-likelihood ratio of each sequence.

    Args:
        log_p1: ``[B, T]`` log-probability of each token under model_1.
        log_p2: ``[B, T]`` the same under model_2.
        mask: ``[B, T]`` True on the tokens of each sequence.

    Returns:
        ``[B]`` fp32 mean of ``log_p1 - log_p2`` over each row's tokens (0 for an empty row).
    """
    mask = mask.bool()
    ratio = torch.where(mask, log_p1.float() - log_p2.float(), torch.zeros_like(log_p1.float()))
    return ratio.sum(-1) / mask.sum(-1).clamp(min=1)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x.mean(axis=axis)


def sign_flip_p_values(gaps: np.ndarray, n_resamples: int = 9999, seed: int = 0) -> np.ndarray:
    """One-sided sign-flip permutation test of ``mean(d) > 0``, one p-value per row.

    Args:
        gaps: ``[N, k]`` per-sample statistics ``d_i`` of N prompts (symmetric about 0 under the
            null).
        n_resamples: Monte Carlo sign patterns when ``k > MAX_EXACT_SAMPLES``.
        seed: seed of those patterns.

    Returns:
        ``[N]`` p-values in (0, 1]; a row of zeros (identical models) gets exactly 1.
    """
    gaps = np.atleast_2d(np.asarray(gaps, dtype=np.float64))
    if gaps.shape[0] == 0:
        return np.zeros(0)
    exact = gaps.shape[1] <= MAX_EXACT_SAMPLES
    result = stats.permutation_test(
        (gaps,),
        _mean,
        permutation_type="samples",  # one sample: flips the signs
        vectorized=True,
        axis=-1,
        n_resamples=np.inf if exact else n_resamples,
        alternative="greater",
        batch=4096,
        rng=np.random.default_rng(seed),
    )
    return np.clip(np.atleast_1d(result.pvalue), 0.0, 1.0)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values): reject ``q < alpha`` for FDR ``alpha``."""
    p_values = np.asarray(p_values, dtype=np.float64)
    if p_values.size == 0:
        return p_values
    return stats.false_discovery_control(p_values, method="bh")


def mean_with_ci(
    values: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of each row and its percentile-bootstrap confidence interval.

    Args:
        values: ``[N, k]`` (or ``[k]``) samples.

    Returns:
        ``(mean, low, high)``, each ``[N]`` (or scalars); the bounds are NaN when ``k < 2``.
    """
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean(axis=-1)
    if values.shape[-1] < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan
    result = stats.bootstrap(
        (values,),
        _mean,
        axis=-1,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",  # BCa is undefined on constant rows (identical models)
        rng=np.random.default_rng(seed),
    )
    return mean, result.confidence_interval.low, result.confidence_interval.high


def _ratio_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return a.mean(axis=axis) / b.mean(axis=axis)


def ratio_of_means_ci(
    a: np.ndarray, b: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> dict | None:
    """``mean(a) / mean(b)`` of two independent samples, with a percentile-bootstrap CI.

    Returns:
        ``{"value", "ci_low", "ci_high"}``, or None when ``mean(b)`` is not positive (nothing to
        divide by: e.g. identical models). Bounds are None when either sample has < 2 values.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if b.size == 0 or a.size == 0 or not b.mean() > 0:
        return None
    value = float(a.mean() / b.mean())
    if a.size < 2 or b.size < 2:
        return {"value": value, "ci_low": None, "ci_high": None}
    result = stats.bootstrap(
        (a, b),
        _ratio_of_means,
        vectorized=True,
        paired=False,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return {"value": value, "ci_low": _finite(low), "ci_high": _finite(high)}


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
