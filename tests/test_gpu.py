"""Checks that need a CUDA device (skipped elsewhere): the pair split over GPUs, FSDP on NCCL.

Run on a GPU machine with ``python -m pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import train_tiny_pair

from soft_prompting.training.module import DivergenceModule

pytestmark = pytest.mark.gpu

TEXTS = ["the cat sat on the mat and the dog sat on the mat too", "what is one plus two"]


def loss_and_gradient(module: DivergenceModule) -> tuple[torch.Tensor, torch.Tensor]:
    module.to("cuda:0")
    batch = module.tokenizer(TEXTS, return_tensors="pt", padding=True).to("cuda:0")
    module.soft_prompt.grad = None
    divergence = module.divergence(batch["input_ids"], batch["attention_mask"])
    divergence.backward()
    return divergence.detach(), module.soft_prompt.grad.clone()


def test_a_pair_split_over_the_gpus_gives_the_whole_pairs_loss_and_gradient(tiny_pair_dirs):
    whole = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3, torch_dtype="float32")
    split = DivergenceModule(
        *tiny_pair_dirs, num_soft_prompt_tokens=3, torch_dtype="float32", device_map="split"
    )
    model = split.pair.model_1
    assert model.lm_head.weight.device == torch.device("cuda:0")
    if torch.cuda.device_count() > 1:  # one GPU: transformers loads the model whole, no map kept
        assert model.hf_device_map["lm_head"] == 0
        assert len(set(model.hf_device_map.values())) > 1
    expected, split_result = loss_and_gradient(whole), loss_and_gradient(split)
    torch.testing.assert_close(split_result[0], expected[0])
    torch.testing.assert_close(split_result[1], expected[1])


def test_fsdp_on_the_gpu_learns_the_prompt_of_the_default_strategy(
    tiny_pair_dirs, text_dir, tmp_path
):
    plain = train_tiny_pair(tmp_path / "plain", tiny_pair_dirs, text_dir, accelerator="gpu")
    fsdp = train_tiny_pair(
        tmp_path / "fsdp", tiny_pair_dirs, text_dir, "training.strategy=fsdp", accelerator="gpu"
    )
    assert "decoder layers sharded over 1 ranks" in fsdp["output"]
    torch.testing.assert_close(fsdp["prompt"], plain["prompt"], atol=1e-5, rtol=1e-4)
