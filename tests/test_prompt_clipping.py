"""Gradient clipping with several prompts clips each prompt's norm on its own."""

from __future__ import annotations

import pytest
import torch

from soft_prompting.training.module import DivergenceModule


@pytest.fixture(scope="module")
def two_prompts(tiny_pair_dirs):
    return DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3, num_prompts=2)


def test_a_huge_gradient_on_one_prompt_does_not_shrink_the_others_step(two_prompts):
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(two_prompts.soft_prompt.shape, generator=generator)
    grad[0] *= 1e6 / grad[0].norm()  # prompt 0: a huge gradient
    grad[1] *= 0.5 / grad[1].norm()  # prompt 1: already within the clip
    small = grad[1].clone()
    two_prompts.soft_prompt.grad = grad
    two_prompts.configure_gradient_clipping(None, 1.0, "norm")
    assert torch.equal(two_prompts.soft_prompt.grad[1], small)
    assert two_prompts.soft_prompt.grad[0].norm().item() == pytest.approx(1.0, rel=1e-4)


def test_one_prompt_and_clipping_by_value_keep_lightnings_clipping(tiny_pair_dirs, two_prompts):
    calls = []
    one = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3)
    for module, algorithm in ((one, "norm"), (two_prompts, "value")):
        module.soft_prompt.grad = torch.ones_like(module.soft_prompt)
        module.clip_gradients = lambda *args: calls.append(args)
        module.configure_gradient_clipping("optimizer", 1.0, algorithm)
    assert calls == [("optimizer", 1.0, "norm"), ("optimizer", 1.0, "value")]
