"""The diversity term of several soft prompts against a float64 reference from its definition."""

import pytest
import torch

from soft_prompting.maths.diversity import co_activation, diversity_penalty


def reference_co_activation(a: list[float], b: list[float]) -> float:
    """mean_b(r_a r_b) - 1 with r = d / mean(d), written out in Python floats."""
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    return sum((x / mean_a) * (y / mean_b) for x, y in zip(a, b, strict=True)) / len(a) - 1


def reference_penalty(profiles: list[list[float]]) -> float:
    per_prompt = [
        sum(max(0.0, reference_co_activation(profiles[k], profiles[j])) for j in range(k)) / k
        for k in range(1, len(profiles))
    ]
    return sum(per_prompt) / len(per_prompt)


@pytest.fixture
def profiles():
    return torch.rand(4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3


def test_co_activation_matches_the_definition_and_the_covariance_form(profiles):
    rows = profiles.tolist()
    expected = [[reference_co_activation(a, b) for b in rows] for a in rows]
    torch.testing.assert_close(co_activation(profiles), torch.tensor(expected, dtype=torch.float64))
    # The same number as cov(a, b) / (mean a * mean b), the population covariance.
    a, b = profiles[0], profiles[1]
    cov = ((a - a.mean()) * (b - b.mean())).mean() / (a.mean() * b.mean())
    torch.testing.assert_close(co_activation(profiles)[0, 1], cov)
    # fp32 input gives the float64 value up to fp32 rounding.
    torch.testing.assert_close(
        co_activation(profiles.float()).double(), co_activation(profiles), atol=1e-5, rtol=1e-5
    )


def test_co_activation_is_scale_free_and_zero_for_a_flat_profile(profiles):
    scaled = profiles.clone()
    scaled[1] *= 17.0
    torch.testing.assert_close(co_activation(scaled), co_activation(profiles))
    flat = torch.stack([profiles[0], torch.full_like(profiles[0], 2.5)])
    assert abs(float(co_activation(flat)[0, 1])) < 1e-12


def test_penalty_matches_the_reference_and_is_zero_for_one_prompt(profiles):
    assert float(diversity_penalty(profiles)) == pytest.approx(
        reference_penalty(profiles.tolist()), rel=1e-12
    )
    assert float(diversity_penalty(profiles[:1])) == 0.0
    # Complementary profiles (peaks on different texts) cost nothing.
    split = torch.tensor([[3.0, 3.0, 0.1, 0.1], [0.1, 0.1, 3.0, 3.0]], dtype=torch.float64)
    assert float(diversity_penalty(split)) == 0.0


def test_penalty_gradient_is_ordered_and_nonzero_between_equal_prompts(profiles):
    equal = profiles[:1].repeat(3, 1).requires_grad_()
    diversity_penalty(equal).backward()
    grad = equal.grad
    # Prompt 0 keeps a single prompt's objective; the later, equal prompts are pushed away.
    assert torch.count_nonzero(grad[0]) == 0
    assert grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0
    # Scale-free: the push never changes a prompt's overall divergence to first order.
    assert abs(float((grad[1] * equal[1].detach()).sum())) < 1e-10
    # It lowers the divergence on the texts where prompt 0 peaks.
    peak = int(profiles[0].argmax())
    assert grad[1, peak] > 0
