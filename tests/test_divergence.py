"""The divergence maths against float64 references written from the definitions."""

import math

import pytest
import torch

from soft_prompting.maths.divergence import (
    DIVERGENCES,
    disagreement_positions,
    forward_kl,
    get_divergence,
    jensen_shannon,
    masked_mean,
    reverse_kl,
    token_disagreement_rate,
    vocab_jaccard_similarity,
)


def reference_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits_p.double(), -1)
    q = torch.softmax(logits_q.double(), -1)
    return (p * (p.log() - q.log())).sum(-1)


def reference_js(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits_p.double(), -1)
    q = torch.softmax(logits_q.double(), -1)
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    return (
        3 * torch.randn(2, 5, 50, generator=generator),
        3 * torch.randn(2, 5, 50, generator=generator),
    )


def test_forward_kl_matches_float64_reference(logits):
    a, b = logits
    torch.testing.assert_close(forward_kl(a, b).double(), reference_kl(a, b), atol=1e-5, rtol=1e-5)


def test_reverse_kl_swaps_the_arguments(logits):
    a, b = logits
    torch.testing.assert_close(reverse_kl(a, b).double(), reference_kl(b, a), atol=1e-5, rtol=1e-5)


def test_jensen_shannon_matches_reference_and_is_bounded(logits):
    a, b = logits
    js = jensen_shannon(a, b)
    torch.testing.assert_close(js.double(), reference_js(a, b), atol=1e-5, rtol=1e-5)
    assert (js >= 0).all() and (js <= math.log(2) + 1e-6).all()
    torch.testing.assert_close(js, jensen_shannon(b, a))


@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
def test_divergence_of_identical_distributions_is_zero(kind, logits):
    a, _ = logits
    assert get_divergence(kind)(a, a).abs().max() < 1e-5


@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
def test_bf16_logits_are_computed_in_fp32(kind, logits):
    a, b = logits
    value = get_divergence(kind)(a.bfloat16(), b.bfloat16())
    assert value.dtype == torch.float32
    reference = get_divergence(kind)(a.bfloat16().float(), b.bfloat16().float())
    torch.testing.assert_close(value, reference)


def test_unknown_divergence_names_the_choices():
    with pytest.raises(ValueError, match="training.divergence"):
        get_divergence("kullback")


def test_masked_positions_do_not_count(logits):
    a, b = logits
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    per_position = forward_kl(a, b)
    expected = per_position[mask].mean()
    torch.testing.assert_close(masked_mean(per_position, mask), expected)
    # Whatever sits at masked positions (even NaN) leaves the mean unchanged.
    poisoned = per_position.clone()
    poisoned[~mask] = float("nan")
    torch.testing.assert_close(masked_mean(poisoned, mask), expected)


def test_masked_mean_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="masked out"):
        masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def test_token_disagreement_and_positions():
    vocab = 4
    tokens_1 = torch.tensor([[0, 1, 2, 3]])
    tokens_2 = torch.tensor([[0, 2, 2, 1]])
    logits_1 = torch.nn.functional.one_hot(tokens_1, vocab).float()
    logits_2 = torch.nn.functional.one_hot(tokens_2, vocab).float()
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert token_disagreement_rate(logits_1, logits_2, mask).item() == pytest.approx(1 / 3)
    assert disagreement_positions(logits_1, logits_2, mask) == [
        {"first": 1, "last": 1, "count": 1, "length": 3}
    ]
    agree = disagreement_positions(logits_1, logits_1, mask)
    assert agree == [{"first": -1, "last": -1, "count": 0, "length": 3}]


def test_vocab_jaccard_similarity():
    assert vocab_jaccard_similarity([1, 2, 3], [2, 3, 4]) == pytest.approx(2 / 4)
    assert vocab_jaccard_similarity([], []) == 1.0
    assert vocab_jaccard_similarity([1, 1], [2]) == 0.0
