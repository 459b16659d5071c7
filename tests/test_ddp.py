"""Data-parallel training: two CPU processes (gloo) learn the soft prompt that one process learns
from the same global batches, because each rank's token-weighted loss is rescaled before DDP
averages it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from soft_prompting.module import DivergenceModule

TEXTS = [  # unequal lengths, so the two ranks of a global batch hold unequal token counts
    "the cat sat on the mat and the dog sat on the mat too",
    "what is one plus two",
    "i am a helpful assistant",
    "water gold oxygen symbol for",
]


def rank_gradient(module, texts, world: int, reduced: torch.Tensor | None) -> torch.Tensor:
    """The soft prompt's gradient of one rank's training loss, with a stand-in for the trainer."""
    module.tokenizer.padding_side = "left"
    batch = dict(module.tokenizer(texts, return_tensors="pt", padding=True))
    strategy = SimpleNamespace(reduce=lambda tensor, reduce_op: reduced)
    module._trainer = SimpleNamespace(world_size=world, strategy=strategy) if world > 1 else None
    try:
        module.soft_prompt.grad = None
        module.training_step(batch, 0).backward()
    finally:
        module._trainer = None
    return module.soft_prompt.grad.clone()


def test_rescaled_rank_losses_average_to_the_global_batch_gradient(tiny_pair_dirs, monkeypatch):
    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    shards = [TEXTS[0::2], TEXTS[1::2]]  # what ResumableBatchSampler gives ranks 0 and 1
    module.tokenizer.padding_side = "left"
    stats = []
    with torch.no_grad():
        for shard in shards:
            batch = module.tokenizer(shard, return_tensors="pt", padding=True)
            tokens = batch["attention_mask"].sum().float()
            mean = module.divergence(batch["input_ids"], batch["attention_mask"])
            stats.append(torch.stack([tokens, mean * tokens]))
    assert stats[0][0] != stats[1][0], "the test needs ranks with unequal token counts"
    all_reduced = stats[0] + stats[1]

    one_process = rank_gradient(module, TEXTS, world=1, reduced=None)
    ddp_average = sum(rank_gradient(module, s, world=2, reduced=all_reduced) for s in shards) / 2
    torch.testing.assert_close(ddp_average, one_process, atol=1e-6, rtol=1e-4)

    # Without the rescaling DDP would average per-rank means: a different gradient.
    naive = sum(rank_gradient(module, s, world=1, reduced=None) for s in shards) / 2
    assert not torch.allclose(naive, one_process, atol=1e-6, rtol=1e-4)


def train_cli(run_dir, tiny_pair_dirs, text_dir, *extra: str) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "soft_prompting.train",
        "model_pair=custom",
        f"model_pair.model_1_name={tiny_pair_dirs[0]}",
        f"model_pair.model_2_name={tiny_pair_dirs[1]}",
        f"data.text_dir={text_dir}",
        "training.num_soft_prompt_tokens=4",
        "training.batch_size=6",  # the global batch: 3 texts per rank with two ranks
        "training.max_steps=3",
        "training.accelerator=cpu",
        "write_dataset=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {
        "prompt": state["state_dict"]["soft_prompt"],
        "step": state["global_step"],
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
    }


@pytest.mark.slow
def test_two_cpu_processes_learn_the_same_prompt_as_one(tiny_pair_dirs, text_dir, tmp_path):
    one = train_cli(tmp_path / "one", tiny_pair_dirs, text_dir)
    two = train_cli(
        tmp_path / "two", tiny_pair_dirs, text_dir, "training.devices=2", "training.strategy=ddp"
    )
    assert one["step"] == two["step"] == 3
    assert not torch.equal(one["prompt"], torch.zeros_like(one["prompt"]))
    torch.testing.assert_close(two["prompt"], one["prompt"], atol=1e-6, rtol=1e-5)
    assert two["metrics"]["val/divergence"] == pytest.approx(
        one["metrics"]["val/divergence"], rel=1e-4
    )
