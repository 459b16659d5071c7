"""Several soft prompts in one run (training.num_prompts): one batched pass per step, the
diversity term, the single-prompt path unchanged, checkpoints, export and tagged candidates."""

from __future__ import annotations

import pytest
import torch
from helpers import fit_briefly

from soft_prompting.config import TrainingConfig
from soft_prompting.errors import ConfigError
from soft_prompting.hard_prompts.dataset import generate_divergent_dataset
from soft_prompting.hard_prompts.sampling import SamplingSettings
from soft_prompting.hard_prompts.strategies import (
    Candidate,
    CategoryTextRanking,
    ContrastiveExploration,
    ProjectionSearch,
    SoftPromptExploration,
)
from soft_prompting.training.module import DivergenceModule

TEXTS = [
    "the cat sat on the mat",
    "what is one plus two",
    "i am a helpful assistant",
    "the dog sat on the mat and read books",
    "water and gold and oxygen",
    "three plus four is seven",
]
TEXTS_BY_CATEGORY = {"animals": TEXTS[0::2], "maths": TEXTS[1::2]}
PROVENANCE = {"model_1_name": "a", "model_2_name": "b", "soft_prompt_checkpoint": None, "seed": 0}


def batch(tokenizer, texts=TEXTS):
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


@pytest.fixture
def several(tiny_pair_dirs):
    return DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4, num_prompts=3, seed=0)


@pytest.fixture
def single(tiny_pair_dirs):
    return DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4, seed=0)


def count_forwards(module) -> dict:
    """Calls of each frozen model's body (every path, fused head or not, goes through it)."""
    calls = {"model_1": 0, "model_2": 0}
    for name in calls:
        body = getattr(module.pair, name).base_model

        def hook(*_, name=name):
            calls[name] += 1

        body.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("fused", [True, False])
def test_k_prompts_cost_one_forward_of_each_model_per_step(several, fused):
    several.fused_head = fused
    calls = count_forwards(several)
    loss = several.training_step(batch(several.tokenizer), 0)
    loss.backward()
    assert calls == {"model_1": 1, "model_2": 1}
    assert several.soft_prompt.grad.shape == (3, 4, 32)
    assert all(g.abs().sum() > 0 for g in several.soft_prompt.grad)


@pytest.mark.parametrize("fused", [True, False])
def test_each_batched_prompt_equals_that_prompt_alone(several, single, fused):
    several.fused_head = single.fused_head = fused
    inputs = batch(several.tokenizer)
    sums, counts = several.prompt_divergences(inputs["input_ids"], inputs["attention_mask"])
    per_prompt = sums.sum(-1) / counts.sum()
    per_prompt[1].backward()
    batched_grad = several.soft_prompt.grad[1].clone()
    for k in range(3):
        prompt = several.soft_prompt[k].detach().clone().requires_grad_()
        alone = single.divergence(inputs["input_ids"], inputs["attention_mask"], prompt=prompt)
        torch.testing.assert_close(per_prompt[k], alone, atol=1e-6, rtol=1e-5)
        if k == 1:
            alone.backward()
            torch.testing.assert_close(batched_grad, prompt.grad, atol=1e-6, rtol=1e-4)
    # Per-text profiles: text b under prompt k alone.
    for b in (0, 3):
        one = {key: value[b : b + 1] for key, value in inputs.items()}
        text_only = one["input_ids"][:, one["attention_mask"][0].bool()]
        alone = single.divergence(
            text_only, torch.ones_like(text_only), prompt=several.soft_prompt[2].detach()
        )
        torch.testing.assert_close(sums[2, b] / counts[b], alone, atol=1e-5, rtol=1e-4)


def test_one_prompt_keeps_the_single_prompt_layout_and_numbers(tiny_pair_dirs, single, several):
    inputs = batch(single.tokenizer)
    assert single.soft_prompt.shape == (4, 32) and single.num_prompts == 1
    # The single prompt's start is the one it always had: real-token rows drawn with the seed.
    pair = single.pair
    ids = torch.randint(0, pair.vocab_size, (4,), generator=torch.Generator().manual_seed(0))
    embeddings = pair.model_1.get_input_embeddings().weight.detach().float()
    torch.testing.assert_close(single.soft_prompt.detach(), embeddings[ids], rtol=0, atol=0)
    # Prompt 0 of several starts where a single prompt of the same seed starts.
    torch.testing.assert_close(several.soft_prompt[0], single.soft_prompt, rtol=0, atol=0)
    weighted = DivergenceModule(
        *tiny_pair_dirs, num_soft_prompt_tokens=4, seed=0, diversity_weight=5.0
    )
    old_path = -single.divergence(inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(weighted.training_step(inputs, 0), old_path)
    assert torch.equal(single.training_step(inputs, 0), old_path)


def train_steps(module, steps: int, lr: float = 0.05) -> None:
    optimizer = torch.optim.Adam([module.soft_prompt], lr=lr)
    inputs = batch(module.tokenizer)
    for step in range(steps):
        optimizer.zero_grad()
        module.training_step(inputs, step).backward()
        optimizer.step()


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_the_diversity_term_parts_two_prompts_from_the_same_init(tiny_pair_dirs, weight):
    module = DivergenceModule(
        *tiny_pair_dirs, num_soft_prompt_tokens=4, num_prompts=2, diversity_weight=weight
    )
    with torch.no_grad():
        module.soft_prompt[1] = module.soft_prompt[0]
    train_steps(module, 15)
    prompts = module.soft_prompt.detach()
    distance = float((prompts[0] - prompts[1]).norm())
    if weight == 0:
        assert distance == 0.0, "without the term, equal prompts get equal updates"
    else:
        scale = float(prompts[0].norm())
        assert distance > 0.05 * scale, distance / scale


def test_config_checks_the_number_of_prompts_and_the_weight():
    for kwargs, key in [
        ({"num_prompts": 0}, "training.num_prompts=0"),
        ({"diversity_weight": -1.0}, "training.diversity_weight=-1.0"),
        ({"num_prompts": 2, "on_policy_weight": 0.5}, "training.on_policy_weight=0.5"),
    ]:
        with pytest.raises(ConfigError, match=key) as caught:
            TrainingConfig(**kwargs)
        assert "\n" not in str(caught.value)
    assert TrainingConfig().num_prompts == 1


def fit(module, run_dir, max_steps: int):
    texts = {c: t * 3 for c, t in TEXTS_BY_CATEGORY.items()}
    return fit_briefly(module, texts, run_dir, max_steps)


def test_k_prompts_checkpoint_validate_and_export(several, tmp_path):
    from peft import PeftModel

    trainer, datamodule = fit(several, tmp_path, max_steps=2)
    metrics = trainer.validate(several, datamodule=datamodule, verbose=False)[0]
    per_prompt = [metrics[f"val/divergence_prompt_{k}"] for k in range(3)]
    assert metrics["val/divergence"] == pytest.approx(sum(per_prompt) / 3, rel=1e-5)
    # (that a checkpoint loads in a fresh process is test_module's; here: the K prompts' shape)
    loaded = DivergenceModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert loaded.num_prompts == 3
    torch.testing.assert_close(loaded.soft_prompt, several.soft_prompt.detach())
    several.save_soft_prompt(tmp_path / "soft_prompt")
    assert (tmp_path / "soft_prompt" / "soft_prompting.json").is_file()
    model_1 = type(several.pair.model_1).from_pretrained(several.hparams.model_1_name)
    peft_model = PeftModel.from_pretrained(model_1, str(tmp_path / "soft_prompt" / "prompt_2"))
    exported = peft_model.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(exported, several.soft_prompt[2].detach())


def test_a_checkpoint_from_before_the_option_still_loads(single, tmp_path):
    fit(single, tmp_path, max_steps=1)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    for key in ("num_prompts", "diversity_weight"):
        state["hyper_parameters"].pop(key)
    torch.save(state, ckpt)
    loaded = DivergenceModule.load_from_checkpoint(ckpt)
    assert loaded.num_prompts == 1 and loaded.soft_prompt.shape == (4, 32)
    torch.testing.assert_close(loaded.soft_prompt, single.soft_prompt)


SPY_PROMPTS = ["the cat sat on the mat", "what is one plus two", "i am a helpful assistant"]


class _SpyStrategy:
    """Proposes one candidate per call, naming the words of the prompt it was run with."""

    uses_soft_prompt = True
    source = "spy"

    def __init__(self):
        self.seen = []

    def propose(self, module, texts_by_category, seed=0):
        self.seen.append(module.active_prompt.detach().clone())
        prompt = SPY_PROMPTS[len(self.seen) - 1]
        return [Candidate("animals", prompt, self.source, score=1.0)]


def test_each_prompt_runs_the_soft_prompt_strategies_and_tags_its_records(several, tmp_path):
    several.eval()
    spy = _SpyStrategy()
    records = generate_divergent_dataset(
        several,
        TEXTS_BY_CATEGORY,
        [CategoryTextRanking(texts_per_category=2, num_candidates=2), spy],
        SamplingSettings(max_length=3, num_generations_per_prompt=1, batch_size=4),
        PROVENANCE,
        tmp_path,
        num_prompts=40,
        max_prompt_nll_ratio=None,
        localise_top=0,
    )
    assert len(spy.seen) == 3
    for k, seen in enumerate(spy.seen):
        torch.testing.assert_close(seen, several.soft_prompt[k].detach(), rtol=0, atol=0)
    tags = {r["prompt"]: r["soft_prompt_index"] for r in records if r["source"] == "spy"}
    assert tags == {prompt: k for k, prompt in enumerate(SPY_PROMPTS)}
    assert {r["soft_prompt_index"] for r in records if r["source"] == "category_text"} == {None}
    assert all({"prompt", "metrics", "source", "category", "round"} <= set(r) for r in records)
    # The strategies that use the soft prompt say so; the others run once.
    assert SoftPromptExploration().uses_soft_prompt and ProjectionSearch().uses_soft_prompt
    assert not ContrastiveExploration().uses_soft_prompt
    assert not getattr(CategoryTextRanking(), "uses_soft_prompt", False)


def test_evaluate_reads_prompts_files_with_and_without_the_tag(tmp_path):
    import json

    from soft_prompting.evaluate import read_prompts

    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "the cat sat", "source": "soft_prompt_exploration", "soft_prompt_index": 1},
        {"prompt": "what is one plus two", "source": "category_text", "soft_prompt_index": None},
        {"prompt": "i am"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    read = read_prompts(path)
    assert [r.get("soft_prompt_index", "absent") for r in read] == [1, None, "absent"]


def test_resuming_with_another_number_of_prompts_names_the_fix(tmp_path):
    from soft_prompting.config import load_train_config
    from soft_prompting.errors import RunDirError
    from soft_prompting.training.pipeline import resume_checkpoint

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"soft_prompt": torch.zeros(2, 8, 32)}, "global_step": 3}, ckpt)
    pair = {"model_1_name": "a", "model_2_name": "b"}
    config = load_train_config({"model_pair": pair, "ckpt_path": str(ckpt)})
    with pytest.raises(RunDirError, match="training.num_prompts=2"):
        resume_checkpoint(config, tmp_path)
    config.training.num_prompts = 2
    assert resume_checkpoint(config, tmp_path)[0] == ckpt


@pytest.mark.slow
def test_the_train_command_with_two_prompts(tmp_path, tiny_pair_dirs, text_dir):
    from conftest import train_tiny_pair

    run = train_tiny_pair(tmp_path / "run", tiny_pair_dirs, text_dir, "training.num_prompts=2")
    assert run["prompt"].shape == (2, 4, 32)
    metrics = run["metrics"]
    mean = (metrics["val/divergence_prompt_0"] + metrics["val/divergence_prompt_1"]) / 2
    assert metrics["val/divergence"] == pytest.approx(mean, rel=1e-5)
    assert "per prompt: " in run["output"]
    for k in (0, 1):
        adapter = tmp_path / "run" / "soft_prompt" / f"prompt_{k}"
        assert (adapter / "adapter_model.safetensors").is_file()
