"""The white-box prior's maths against a float64 reference written from the definition.

The strategy itself (:class:`WhiteBoxPrior`) is tested in tests/test_strategies.py."""

import pytest
import torch

from soft_prompting.maths.row_change import changed_rows_score, row_shift


def reference_shift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    distance = ((b - a) ** 2).sum(-1).sqrt()
    return distance / (distance**2).mean().sqrt()


def test_row_shift_matches_float64_reference_and_is_scale_free():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(50, 16, generator=generator)
    b = a + 0.01 * torch.randn(50, 16, generator=generator)
    b[7] += 0.5  # one row moved far
    shift = row_shift(a, b)
    torch.testing.assert_close(shift.double(), reference_shift(a, b), rtol=1e-5, atol=1e-6)
    assert int(shift.argmax()) == 7
    torch.testing.assert_close(row_shift(100 * a, 100 * b), shift, rtol=1e-4, atol=1e-5)


def test_changed_rows_score_sums_matrices_on_equal_footing():
    generator = torch.Generator().manual_seed(1)
    embed = torch.randn(30, 8, generator=generator)
    head = torch.randn(30, 8, generator=generator)
    embed_2, head_2 = embed.clone(), head.clone()
    embed_2[3] += 1.0
    head_2[3] += 1000.0
    head_2[5] += 900.0
    score = changed_rows_score([(embed, embed_2), (head, head_2)])
    expected = reference_shift(embed, embed_2) + reference_shift(head, head_2)
    torch.testing.assert_close(score.double(), expected, rtol=1e-5, atol=1e-6)
    assert score.argsort(descending=True)[:2].tolist() == [3, 5]


def test_identical_matrices_score_zero_and_shapes_must_match():
    w = torch.randn(10, 4)
    assert torch.equal(row_shift(w, w.clone()), torch.zeros(10))
    with pytest.raises(ValueError, match="shapes differ"):
        row_shift(w, torch.randn(11, 4))
    with pytest.raises(ValueError, match="no matrices"):
        changed_rows_score([])
