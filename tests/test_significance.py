"""The evidence maths against float64 references: the sign-flip test, Benjamini–Hochberg, the
bootstrap intervals and the per-sequence log-likelihood ratio."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from soft_prompting.maths.significance import (
    benjamini_hochberg,
    mean_with_ci,
    ratio_of_means_ci,
    sequence_log_likelihood_ratio,
    sign_flip_p_values,
)


def exact_sign_flip_reference(row: np.ndarray) -> float:
    """P(mean of randomly signed |d| >= observed mean), by enumerating every sign pattern."""
    observed = row.mean()
    count = 0
    patterns = list(itertools.product((-1.0, 1.0), repeat=len(row)))
    for signs in patterns:
        count += (np.array(signs) * np.abs(row)).mean() >= observed - 1e-12
    return count / len(patterns)


def test_sign_flip_p_values_match_full_enumeration():
    rng = np.random.default_rng(3)
    gaps = rng.normal(0.3, 1.0, size=(6, 7))
    gaps[2, :3] = 0.0  # ties at zero count as they should
    expected = [exact_sign_flip_reference(row) for row in gaps]
    assert sign_flip_p_values(gaps) == pytest.approx(expected, abs=1e-12)


def test_identical_models_give_p_one_and_all_positive_gaps_the_smallest_p():
    p = sign_flip_p_values(np.array([[0.0] * 8, [0.5] * 8]))
    assert p[0] == 1.0
    assert p[1] == pytest.approx(2.0**-8)


def test_sign_flip_test_holds_its_level_under_the_null():
    """Symmetric gaps (the null): about 5 % of p-values fall below 0.05, not more."""
    rng = np.random.default_rng(0)
    gaps = rng.standard_t(df=3, size=(1000, 10))
    share = float((sign_flip_p_values(gaps) < 0.05).mean())
    assert 0.02 < share <= 0.07


def benjamini_hochberg_reference(p: np.ndarray) -> np.ndarray:
    n = len(p)
    order = np.argsort(p)
    q = np.empty(n)
    running = 1.0
    for rank in range(n, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * n / rank)
        q[i] = running
    return q


def test_benjamini_hochberg_matches_the_step_up_reference():
    p = np.array([0.001, 0.04, 0.03, 0.2, 0.009, 0.5, 0.049])
    assert benjamini_hochberg(p) == pytest.approx(benjamini_hochberg_reference(p), abs=1e-12)
    assert benjamini_hochberg(np.array([])).size == 0


def test_bootstrap_interval_brackets_the_mean_and_collapses_on_constant_rows():
    rng = np.random.default_rng(1)
    values = np.vstack([rng.normal(2.0, 1.0, 50), np.full(50, 0.25)])
    mean, low, high = mean_with_ci(values, n_resamples=500)
    assert mean == pytest.approx(values.mean(axis=1))
    assert low[0] < mean[0] < high[0] and high[0] - low[0] < 1.0
    assert (low[1], high[1]) == (0.25, 0.25)
    _, low_one, _ = mean_with_ci(np.array([[1.0]]))
    assert np.isnan(low_one[0])


def test_ratio_of_means_has_a_ci_and_no_value_without_a_positive_baseline():
    a, b = np.array([2.0, 4.0, 6.0, 8.0]), np.array([1.0, 1.0, 2.0, 2.0])
    ratio = ratio_of_means_ci(a, b, n_resamples=500)
    assert ratio["value"] == pytest.approx(5.0 / 1.5)
    assert ratio["ci_low"] <= ratio["value"] <= ratio["ci_high"]
    assert ratio_of_means_ci(a, np.zeros(4)) is None


def test_sequence_log_likelihood_ratio_against_float64_reference():
    generator = torch.Generator().manual_seed(0)
    log_p1 = -torch.rand(3, 5, generator=generator) * 4
    log_p2 = -torch.rand(3, 5, generator=generator) * 4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    got = sequence_log_likelihood_ratio(log_p1, log_p2, mask)
    for row in range(3):
        keep = mask[row].numpy()
        diff = log_p1[row].double().numpy()[keep] - log_p2[row].double().numpy()[keep]
        expected = diff.mean() if keep.any() else 0.0
        assert float(got[row]) == pytest.approx(expected, abs=1e-6)
