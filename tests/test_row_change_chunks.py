"""The white-box prior's row shifts are computed a chunk of rows at a time: no intermediate is a
whole ``[V, H]`` matrix (a 151k-vocabulary model's would be gigabytes), the values unchanged."""

from __future__ import annotations

import torch

from soft_prompting.maths.row_change import changed_rows_score, row_shift


class Recording(torch.Tensor):
    """A tensor that records the largest tensor any torch operation on it returns."""

    largest = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        if isinstance(result, torch.Tensor):
            Recording.largest = max(Recording.largest, result.numel())
        return result


def test_no_intermediate_holds_a_whole_matrix():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=generator).bfloat16()
    b = (a.float() + torch.randn(64, 8, generator=generator)).bfloat16()
    expected = row_shift(a.float(), b.float(), chunk_rows=64)
    Recording.largest = 0
    shift = row_shift(a.as_subclass(Recording), b.as_subclass(Recording), chunk_rows=16)
    assert 0 < Recording.largest <= 16 * 8
    torch.testing.assert_close(shift.as_subclass(torch.Tensor), expected, rtol=0, atol=0)


def test_uneven_chunks_give_the_same_shifts_and_the_score_comes_to_the_cpu():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(50, 16, generator=generator)
    b = a + 0.01 * torch.randn(50, 16, generator=generator)
    torch.testing.assert_close(row_shift(a, b, chunk_rows=7), row_shift(a, b, chunk_rows=50))
    assert changed_rows_score([(a, b)]).device == torch.device("cpu")
