"""Training on several processes: two CPU processes (gloo) learn the soft prompt that one process
learns from the same global batches — with DDP (each rank holds the whole pair) and with FSDP (the
pair's decoder layers sharded over the ranks) — because each rank's token-weighted loss is rescaled
before the ranks' gradients are averaged."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import train_tiny_pair
from transformers import AutoModelForCausalLM

from soft_prompting.errors import DivergenceError
from soft_prompting.training.module import DivergenceModule

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
            stats.append(torch.stack([tokens, mean * tokens, tokens.new_tensor(len(shard))]))
    assert stats[0][0] != stats[1][0], "the test needs ranks with unequal token counts"
    all_reduced = stats[0] + stats[1]

    one_process = rank_gradient(module, TEXTS, world=1, reduced=None)
    ddp_average = sum(rank_gradient(module, s, world=2, reduced=all_reduced) for s in shards) / 2
    torch.testing.assert_close(ddp_average, one_process, atol=1e-6, rtol=1e-4)

    # Without the rescaling DDP would average per-rank means: a different gradient.
    naive = sum(rank_gradient(module, s, world=1, reduced=None) for s in shards) / 2
    assert not torch.allclose(naive, one_process, atol=1e-6, rtol=1e-4)


def test_a_nan_on_another_rank_stops_this_rank_too(tiny_pair_dirs, monkeypatch):
    """Every rank checks the all-reduced mean, so no rank waits in a collective for a dead one."""
    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    both_ranks = torch.tensor([20.0, float("nan"), 4.0])  # tokens, divergence sum, texts
    with pytest.raises(DivergenceError, match="nan at training batch 0"):
        rank_gradient(module, TEXTS[:2], world=2, reduced=both_ranks)


@pytest.fixture(scope="module")
def one_process(tiny_pair_dirs, text_dir, tmp_path_factory) -> dict:
    return train_tiny_pair(
        tmp_path_factory.mktemp("one"), tiny_pair_dirs, text_dir, in_process=True
    )


def assert_same_run(two: dict, one: dict) -> None:
    assert one["step"] == two["step"] == 3
    assert not torch.equal(one["prompt"], torch.zeros_like(one["prompt"]))
    torch.testing.assert_close(two["prompt"], one["prompt"], atol=1e-6, rtol=1e-5)
    for metric in ("val/divergence", "val/divergence_no_prompt"):
        assert two["metrics"][metric] == pytest.approx(one["metrics"][metric], rel=1e-4)


@pytest.mark.slow
def test_two_cpu_processes_learn_the_same_prompt_as_one(
    one_process, tiny_pair_dirs, text_dir, tmp_path
):
    two = train_tiny_pair(
        tmp_path / "two", tiny_pair_dirs, text_dir, "training.devices=2", "training.strategy=ddp"
    )
    assert_same_run(two, one_process)


@pytest.mark.slow
def test_fsdp_shards_the_pair_and_learns_the_same_prompt_as_one_process(
    one_process, tiny_pair_dirs, text_dir, tmp_path
):
    run_dir = tmp_path / "fsdp"
    two = train_tiny_pair(
        run_dir,
        tiny_pair_dirs,
        text_dir,
        "training.devices=2",
        "training.strategy=fsdp",
        "training.gradient_checkpointing=true",  # as large pairs run: recompute inside FSDP units
        "write_dataset=true",
    )
    assert_same_run(two, one_process)
    # No rank holds the pair, so the dataset is left to a one-process run, whose command is printed.
    assert "model_pair.device_map=split ckpt_path=last" in two["output"]
    assert not (run_dir / "divergent_dataset.jsonl").exists()
    # Each rank really holds half of every decoder layer; embeddings, norm and head stay whole.
    held = [int(n) for n in re.findall(r"rank \d holds (\d+) of LlamaForCausalLM", two["output"])]
    assert len(held) == 4, two["output"][-3000:]  # 2 ranks x 2 models
    model = AutoModelForCausalLM.from_pretrained(tiny_pair_dirs[0])
    layers = sum(p.numel() for p in model.model.layers.parameters())
    whole = sum(p.numel() for p in model.parameters())
    assert all(n == whole - layers // 2 for n in held)

    # The sharded run's checkpoint resumes in one process, which writes the dataset.
    resumed = train_tiny_pair(
        run_dir,
        tiny_pair_dirs,
        text_dir,
        "ckpt_path=last",
        "write_dataset=true",
        "generation.num_prompts=4",
        "generation.max_length=4",
        "generation.num_generations_per_prompt=1",
        "generation.strategies=[{_target_:soft_prompting.hard_prompts.strategies.CategoryTextRanking}]",
        in_process=True,  # a one-process run: no interpreter of its own needed
    )
    torch.testing.assert_close(resumed["prompt"], two["prompt"])
    assert resumed["step"] == 3
    assert (run_dir / "divergent_dataset.jsonl").read_text().count("\n") == 4


def test_each_prompts_logged_training_divergence_is_the_global_batchs(tiny_pair_dirs, monkeypatch):
    """With several prompts, rank 0 logs each prompt's divergence on the global batch (it logged
    its own shard's), token-weighted as train/divergence is."""
    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=3, num_prompts=2)
    module.tokenizer.padding_side = "left"
    logged: dict[str, float] = {}
    monkeypatch.setattr(
        module, "log", lambda name, value, **kw: logged.update({name: float(value)})
    )
    shards = [TEXTS[0::2], TEXTS[1::2]]

    def step(texts, world: int, reduce) -> dict[str, float]:
        batch = dict(module.tokenizer(texts, return_tensors="pt", padding=True))
        strategy = SimpleNamespace(reduce=reduce)
        module._trainer = SimpleNamespace(world_size=world, strategy=strategy)
        try:
            with torch.no_grad():
                module.training_step(batch, 0)
        finally:
            module._trainer = None
        return {k: v for k, v in logged.items() if k.startswith("train/divergence")}

    local = [[], []]  # every all-reduce of each rank, in order
    for rank, shard in enumerate(shards):
        step(shard, 2, lambda tensor, reduce_op, r=rank: local[r].append(tensor) or tensor)
    assert local[0][0][0] != local[1][0][0], "the test needs ranks with unequal token counts"
    summed = iter([a + b for a, b in zip(*local, strict=True)])
    ddp = step(shards[0], 2, lambda tensor, reduce_op: next(summed))
    one = step(TEXTS, 1, None)
    assert set(ddp) == {
        "train/divergence",
        "train/divergence_prompt_0",
        "train/divergence_prompt_1",
    }
    assert ddp == pytest.approx(one, rel=1e-5)
