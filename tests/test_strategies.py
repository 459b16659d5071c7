"""Hard-prompt strategies and the resumable dataset writer, on tiny random pairs (no hub)."""

from __future__ import annotations

import json

import pytest
import torch

from soft_prompting import run_files
from soft_prompting.hard_prompts.dataset import generate_divergent_dataset, score_candidates
from soft_prompting.hard_prompts.sampling import SamplingSettings
from soft_prompting.hard_prompts.strategies import (
    Candidate,
    CategoryTextRanking,
    ProjectionSearch,
    SoftPromptExploration,
    allowed_token_ids,
    build_strategies,
    cut_at_divergence_peak,
    discrete_search,
    merge_near_duplicates,
    project_to_tokens,
    propose_candidates,
)
from soft_prompting.run_files import read_jsonl
from soft_prompting.training.module import DivergenceModule

TEXTS = {
    "animals": ["the cat sat on the mat", "the dog sat on the mat and read books"],
    "maths": ["what is one plus two", "three plus four is seven", "five minus one is four"],
}
SETTINGS = SamplingSettings(max_length=4, num_generations_per_prompt=2, batch_size=2)
PROVENANCE = {"model_1_name": "a", "model_2_name": "b", "soft_prompt_checkpoint": None, "seed": 0}


@pytest.fixture(scope="module")
def module(tiny_pair_dirs) -> DivergenceModule:
    return DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4).eval()


@pytest.fixture(scope="module")
def identical(tiny_pair_dirs) -> DivergenceModule:
    return DivergenceModule(tiny_pair_dirs[0], tiny_pair_dirs[0], num_soft_prompt_tokens=4).eval()


def test_projection_returns_valid_allowed_token_ids(module):
    pair = module.pair
    allowed = allowed_token_ids(pair.tokenizer, pair.vocab_size)
    embeddings = pair.model_1.get_input_embeddings().weight[: pair.vocab_size].detach()
    ids = project_to_tokens(module.soft_prompt.detach(), embeddings, allowed)
    assert ids.shape == (4,) and ids.dtype == torch.long
    assert all(0 <= i < pair.vocab_size and allowed[i] for i in ids.tolist())
    # A virtual token equal to a real embedding projects onto that token.
    assert project_to_tokens(embeddings[[7, 9]], embeddings, allowed).tolist() == [7, 9]


def test_hard_prompts_use_no_lone_bytes(organism_dirs):
    """The organisms' byte-level tokenizer has 128 tokens that decode to U+FFFD alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(organism_dirs["base"])
    allowed = allowed_token_ids(tokenizer, len(tokenizer))
    broken = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert len(broken) == 128 and not allowed[broken].any()
    assert allowed.sum() == len(tokenizer) - 128 - len(set(tokenizer.all_special_ids))


def test_discrete_search_never_increases_its_loss(module):
    start = torch.tensor([5, 6, 7, 8])
    result = discrete_search(module, start, num_steps=6, top_k=8, num_candidates=16, seed=0)
    assert len(result.losses) == 7
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:], strict=False))
    assert result.loss == result.losses[-1] <= result.losses[0]
    special = set(module.tokenizer.all_special_ids)
    assert not special & set(result.token_ids)


def test_cut_ends_the_prompt_at_the_divergence_peak(module):
    text = "the cat sat on the mat and read books"
    [(prompt, peak)] = cut_at_divergence_peak(module, [text])
    assert text.startswith(prompt) and len(prompt.split()) >= 2
    from soft_prompting.hard_prompts.strategies import per_token_divergence

    [(ids, values)] = per_token_divergence(module, [text])
    assert peak == pytest.approx(float(values[1:].max()), rel=1e-5)


def test_every_strategy_proposes_candidates_and_they_merge(module):
    strategies = [
        CategoryTextRanking(num_candidates=3),
        SoftPromptExploration(num_seeds=2, samples_per_seed=2, max_new_tokens=5),
        ProjectionSearch(num_steps=2, search_batch=8, num_restarts=1, num_candidates=2),
    ]
    candidates = propose_candidates(strategies, module, TEXTS, limit=6, seed=0)
    assert 0 < len(candidates) <= 6
    assert {c.source for c in candidates} >= {"category_text", "soft_prompt_exploration"}
    assert all(isinstance(c, Candidate) and c.prompt for c in candidates)


def test_near_duplicates_are_merged_keeping_the_best():
    merged = merge_near_duplicates(
        [
            Candidate("a", "What is one plus two?", "x", 1.0),
            Candidate("a", "what is one plus two", "y", 2.0),
            Candidate("a", "the cat sat", "x", 0.5),
        ]
    )
    assert [(c.prompt, c.score) for c in merged] == [
        ("what is one plus two", 2.0),
        ("the cat sat", 0.5),
    ]


def test_strategies_come_from_target_dicts():
    built = build_strategies(
        [{"_target_": "soft_prompting.hard_prompts.strategies.ProjectionSearch", "num_steps": 3}]
    )
    assert isinstance(built[0], ProjectionSearch) and built[0].num_steps == 3


def test_scoring_without_soft_prompt_really_omits_it(module, monkeypatch):
    """Records must not change whatever the soft prompt holds."""
    rows = [{"category": "c", "prompt": "the cat sat", "source": "s"}]
    first = score_candidates(module.pair, rows, SETTINGS, PROVENANCE, progress=False)
    with torch.no_grad():
        module.soft_prompt.mul_(100.0)
    second = score_candidates(module.pair, rows, SETTINGS, PROVENANCE, progress=False)
    assert first[0]["metrics"] == second[0]["metrics"]
    # The strategies' measurements are prompt-free too: the divergence of bare text.
    from soft_prompting.hard_prompts.strategies import per_token_divergence

    [(ids, values)] = per_token_divergence(module, ["the cat sat"])
    batch = module.tokenizer(["the cat sat"], return_tensors="pt")
    bare = module.divergence(batch["input_ids"], batch["attention_mask"], use_prompt=False)
    assert float(values.mean()) == pytest.approx(float(bare), rel=1e-4)


def test_identical_models_give_zero_divergence_and_no_discoveries(identical, tmp_path):
    from soft_prompting.evaluate import DISCOVERY_THRESHOLD, is_discovery

    strategies = [
        CategoryTextRanking(num_candidates=3),
        SoftPromptExploration(num_seeds=2, max_new_tokens=4),
    ]
    records = generate_divergent_dataset(
        identical, TEXTS, strategies, SETTINGS, PROVENANCE, tmp_path, num_prompts=4
    )
    assert records
    assert all(abs(r["metrics"]["kl_divergence"]) < 1e-5 for r in records)
    assert not any(is_discovery(r, baseline=0.0) for r in records)
    assert DISCOVERY_THRESHOLD > 0


def test_dataset_is_sorted_with_provenance_and_resumes_without_duplicates(module, tmp_path):
    rows = [
        {"category": "c", "prompt": p, "source": "s"}
        for p in ("the cat sat", "one plus two", "i am helpful", "the dog read", "water gold")
    ]
    # A run killed after its first batch, with a torn last line.
    partial = tmp_path / run_files.partial(run_files.DATASET_JSONL)
    first = score_candidates(module.pair, rows[:2], SETTINGS, PROVENANCE, partial, progress=False)
    with partial.open("a") as handle:
        handle.write('{"prompt": "torn')
    calls = []
    import soft_prompting.hard_prompts.dataset as dataset

    original = dataset.score_prompts

    def counting(pair, prompts, *args, **kwargs):
        calls.extend(prompts)
        return original(pair, prompts, *args, **kwargs)

    dataset.score_prompts = counting
    try:
        records = generate_divergent_dataset(
            module, TEXTS, [], SETTINGS, PROVENANCE, tmp_path, num_prompts=5, candidates=rows
        )
    finally:
        dataset.score_prompts = original
    assert sorted(calls) == sorted(r["prompt"] for r in rows[2:])
    assert sorted(r["prompt"] for r in records) == sorted(r["prompt"] for r in rows)
    kls = [r["metrics"]["kl_divergence"] for r in records]
    assert kls == sorted(kls, reverse=True)
    by_prompt = {r["prompt"]: r for r in records}
    assert by_prompt["the cat sat"]["metrics"] == first[0]["metrics"]
    assert all(r["provenance"] == PROVENANCE and r["source"] == "s" for r in records)
    assert all(r["generation_params"]["max_length"] == 4 for r in records)
    assert not partial.exists()
    on_disk = read_jsonl(tmp_path / "divergent_dataset.jsonl")
    assert [r["prompt"] for r in on_disk] == [r["prompt"] for r in records]
    assert torch.load(tmp_path / "divergent_dataset.pt", weights_only=True) == json.loads(
        json.dumps(records)
    )


def test_on_policy_term_is_finite_and_reaches_the_soft_prompt(tiny_pair_dirs):
    module = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4, on_policy_tokens=3)
    batch = module.tokenizer(["the cat sat", "i am"], return_tensors="pt", padding=True)
    value = module.on_policy_divergence(batch["input_ids"], batch["attention_mask"])
    assert torch.isfinite(value) and value > 0
    value.backward()
    assert module.soft_prompt.grad is not None and module.soft_prompt.grad.abs().sum() > 0
