"""One default for the diversity weight: the constructor's, which the train config's agrees with,
used too when the hparams lack the key."""

from __future__ import annotations

import inspect

import torch

from soft_prompting.config import TrainingConfig
from soft_prompting.training.module import DivergenceModule


def test_the_constructor_and_the_train_config_agree():
    default = inspect.signature(DivergenceModule.__init__).parameters["diversity_weight"].default
    assert default == TrainingConfig().diversity_weight


def test_hparams_without_the_key_use_the_constructors_default(tiny_pair_dirs):
    from soft_prompting.maths.diversity import diversity_penalty

    # Seed 1: two prompts whose per-text profiles co-activate, so the penalty counts.
    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3, num_prompts=2, seed=1)
    texts = ["the cat sat on the mat", "one plus two is three", "i am a helpful assistant"]
    texts += ["water gold oxygen symbol", "stealing is wrong because it hurts others"]
    batch = module.tokenizer(texts + ["i like to read books"], return_tensors="pt", padding=True)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        sums, counts = module.prompt_divergences(batch["input_ids"], batch["attention_mask"])
        assert diversity_penalty(sums / counts) > 0
        saved = module.training_step(batch, 0)
        del module.hparams["diversity_weight"]
        assert torch.equal(module.training_step(batch, 0), saved)
