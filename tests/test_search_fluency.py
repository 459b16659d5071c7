"""ProjectionSearch's fluency term must reach the token choice (issue 12): its NLL targets are the
differentiable one-hot rows, not their argmax."""

from __future__ import annotations

import pytest
import torch

from soft_prompting.hard_prompts.strategies import _prefix_ids, search_loss
from soft_prompting.training.module import DivergenceModule


@pytest.fixture(scope="module")
def module(tiny_pair_dirs) -> DivergenceModule:
    return DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4).eval()


def test_fluency_gradient_on_the_last_token_is_its_log_probability(module):
    """The NLL's gradient on the last prompt token is -log p1(token | the tokens before) / n.

    That token is only a *target* of the NLL (its own prediction is the continuation's): with
    targets taken as ``argmax`` of the one-hot rows its gradient would be 0, and the swap ranking
    would ignore fluency.
    """
    ids = torch.tensor([5, 6, 7, 8])
    prefix = _prefix_ids(module.tokenizer)
    grads = []
    for weight in (0.0, 1.0):
        one_hot = torch.nn.functional.one_hot(ids, module.pair.vocab_size).float()[None]
        one_hot.requires_grad_(True)
        search_loss(module, one_hot, prefix, weight).sum().backward()
        grads.append(one_hot.grad[0, -1])
    fluency_grad = grads[1] - grads[0]  # the loss is linear in the weight
    context = torch.tensor([prefix + ids[:-1].tolist()])
    with torch.no_grad():
        logits = module.pair.model_1(input_ids=context).logits[0, -1, : module.pair.vocab_size]
    n_terms = len(ids) if prefix else len(ids) - 1
    expected = -logits.float().log_softmax(-1) / n_terms
    assert torch.allclose(fluency_grad, expected, atol=1e-4)
