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
    _prefix_ids,
    allowed_token_ids,
    build_strategies,
    cut_at_divergence_peak,
    discrete_search,
    merge_near_duplicates,
    project_to_tokens,
    propose_candidates,
    search_loss,
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


def test_hard_prompts_use_no_lone_bytes(organism_tokenizer):
    """The organisms' byte-level tokenizer has 128 tokens that decode to U+FFFD alone."""
    tokenizer = organism_tokenizer
    allowed = allowed_token_ids(tokenizer, len(tokenizer))
    broken = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert len(broken) == 128 and not allowed[broken].any()
    assert allowed.sum() == len(tokenizer) - 128 - len(set(tokenizer.all_special_ids))


def test_discrete_search_lowers_the_loss_it_reports(module):
    start = torch.tensor([5, 6, 7, 8])
    result = discrete_search(module, start, num_steps=6, top_k=8, num_candidates=16, seed=0)
    prefix = _prefix_ids(module.tokenizer)

    def loss_of(ids: list[int]) -> float:
        with torch.no_grad():
            return float(search_loss(module, torch.tensor([ids]), prefix, 0.2)[0])

    # Every reported loss is the recomputed loss of the prompt reported with it.
    assert len(result.losses) == 7
    assert result.losses[0] == pytest.approx(loss_of(start.tolist()), rel=1e-5)
    for loss, ids in result.visited:
        assert loss == pytest.approx(loss_of(ids), rel=1e-5), ids
    assert (result.loss, result.token_ids) == result.visited[-1]
    assert result.loss == result.losses[-1]
    # The search moved, one token at a time, and each move lowered the loss.
    assert len(result.visited) >= 3 and result.loss < result.losses[0]
    for (loss_a, ids_a), (loss_b, ids_b) in zip(result.visited, result.visited[1:], strict=False):
        assert loss_b < loss_a
        assert sum(a != b for a, b in zip(ids_a, ids_b, strict=True)) == 1
    assert result.losses == sorted(result.losses, reverse=True)
    special = set(module.tokenizer.all_special_ids)
    assert not special & {i for _, ids in result.visited for i in ids}


def test_cut_ends_the_prompt_at_the_divergence_peak(module):
    text = "the cat sat on the mat and read books"
    [(prompt, peak)] = cut_at_divergence_peak(module, [text])
    assert text.startswith(prompt) and len(prompt.split()) >= 2
    from soft_prompting.hard_prompts.strategies import per_token_divergence

    [(ids, values)] = per_token_divergence(module, [text])
    assert peak == pytest.approx(float(values[1:].max()), rel=1e-5)


def test_a_text_without_any_divergence_is_kept_whole(identical):
    """Identical models diverge nowhere: no peak to cut at, so no two-token stubs."""
    texts = ["the cat sat on the mat", "what is one plus two"]
    assert cut_at_divergence_peak(identical, texts) == [(text, 0.0) for text in texts]


def tiny_strategies() -> list:
    return [
        CategoryTextRanking(num_candidates=3),
        SoftPromptExploration(num_seeds=2, samples_per_seed=2, max_new_tokens=5),
        ProjectionSearch(num_steps=2, search_batch=8, num_restarts=1, num_candidates=2),
    ]


@pytest.mark.parametrize("strategy", tiny_strategies(), ids=lambda s: type(s).__name__)
def test_each_strategy_proposes_candidates_of_its_own(module, strategy):
    candidates = strategy.propose(module, TEXTS, seed=0)
    assert 0 < len(candidates) <= strategy.num_candidates
    for candidate in candidates:
        assert isinstance(candidate, Candidate) and candidate.prompt.strip()
        assert candidate.source == strategy.source and candidate.category in TEXTS


def test_candidates_merge_and_every_strategy_keeps_a_place(module):
    strategies = tiny_strategies()
    candidates = propose_candidates(strategies, module, TEXTS, limit=6, seed=0)
    assert len(candidates) == 6
    # Round-robin: the first three come from the three strategies.
    assert {c.source for c in candidates[:3]} == {s.source for s in strategies}
    assert set(merge_near_duplicates(candidates)) == set(candidates)  # no near-duplicates left


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


def test_dataset_records_are_the_bare_pairs_whatever_the_soft_prompt(
    module, tiny_pair_dirs, tmp_path
):
    """The module that writes the dataset holds a soft prompt; scoring must not use it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_prompting.pair.loading import ModelPair

    other = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4, seed=7).eval()
    batch = module.tokenizer(["the cat sat on the mat"], return_tensors="pt")
    with torch.no_grad():
        prompted = [
            float(m.divergence(batch["input_ids"], batch["attention_mask"]))
            for m in (module, other)
        ]
    assert prompted[0] != pytest.approx(prompted[1], rel=1e-3), "the two prompts must matter"
    rows = [
        {"category": "c", "prompt": p, "source": "s"}
        for p in ("the cat sat", "what is one plus two", "i am helpful")
    ]

    def metrics_by_prompt(records: list[dict]) -> dict:
        return {r["prompt"]: (r["generation_1"], r["generation_2"], r["metrics"]) for r in records}

    written = [
        metrics_by_prompt(
            generate_divergent_dataset(
                m, TEXTS, [], SETTINGS, PROVENANCE, tmp_path / name, num_prompts=3, candidates=rows
            )
        )
        for m, name in ((module, "trained"), (other, "other"))
    ]
    assert written[0] == written[1]
    # And they are what the pair gives with no module and no prompt anywhere, loaded afresh.
    bare = ModelPair(
        *(AutoModelForCausalLM.from_pretrained(d).eval() for d in tiny_pair_dirs),
        AutoTokenizer.from_pretrained(tiny_pair_dirs[0]),
    )
    direct = score_candidates(bare, rows, SETTINGS, PROVENANCE, progress=False)
    assert metrics_by_prompt(direct) == written[0]


def test_strategy_measurements_are_prompt_free(module, tiny_pair_dirs):
    """The divergence the strategies cut and rank by is the bare text's, whatever the prompt."""
    from soft_prompting.hard_prompts.strategies import per_token_divergence

    other = DivergenceModule(*tiny_pair_dirs, num_soft_prompt_tokens=4, seed=7).eval()
    text = "the cat sat on the mat"
    [(ids, values)] = per_token_divergence(module, [text])
    [(other_ids, other_values)] = per_token_divergence(other, [text])
    assert ids == other_ids and torch.equal(values, other_values)
    batch = module.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        bare = module.divergence(batch["input_ids"], batch["attention_mask"], use_prompt=False)
        prompted = module.divergence(batch["input_ids"], batch["attention_mask"])
    assert float(values.mean()) == pytest.approx(float(bare), rel=1e-4)
    assert float(values.mean()) != pytest.approx(float(prompted), rel=1e-3)


def test_identical_models_give_zero_divergence_and_no_discoveries(identical, tmp_path):
    from soft_prompting.maths.significance import sign_flip_p_values

    strategies = [
        CategoryTextRanking(num_candidates=3),
        SoftPromptExploration(num_seeds=2, max_new_tokens=4),
    ]
    records = generate_divergent_dataset(
        identical, TEXTS, strategies, SETTINGS, PROVENANCE, tmp_path, num_prompts=4
    )
    assert records
    assert all(abs(r["metrics"]["kl_divergence"]) < 1e-5 for r in records)
    assert all(r["metrics"]["reliability"] == 0 for r in records)
    gaps = [r["paired_samples"]["llr_gap"] for r in records]
    assert (sign_flip_p_values(gaps) == 1.0).all()  # nothing can be significant


def test_dataset_is_sorted_with_provenance_and_resumes_without_duplicates(module, tmp_path):
    rows = [
        {"category": "c", "prompt": p, "source": "s"}
        for p in ("the cat sat", "one plus two", "i am helpful", "the dog read", "water gold")
    ]
    # A run killed after its first batch, with a torn last line; its fingerprint says which
    # settings made the partial file (without one, a partial file is discarded, never mixed in).
    from soft_prompting.hard_prompts.dataset import dataset_fingerprint

    fingerprint = dataset_fingerprint(module, TEXTS, [], SETTINGS, PROVENANCE, 5, 0, rows)
    run_files.write_json(tmp_path / run_files.DATASET_FINGERPRINT, {"fingerprint": fingerprint})
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


@pytest.mark.parametrize(
    ("name", "setting", "message"),
    [
        ("SoftPromptExploration", {"max_new_tokens": 0}, "max_new_tokens=0: must be a whole"),
        ("ContrastiveExploration", {"sides": ["model_3"]}, "sides=['model_3']: a list of one"),
        ("ContrastiveExploration", {"sides": []}, "sides=[]: a list of one or both"),
        ("SoftPromptExploration", {"sides": "model_1"}, "sides='model_1': a list of one or both"),
        ("SoftPromptExploration", {"temperature": -1}, "temperature=-1: must be a number >= 0"),
        ("ContrastiveExploration", {"alpha": -0.5}, "alpha=-0.5: must be a number >= 0"),
        ("ProjectionSearch", {"fluency_weight": "high"}, "fluency_weight='high': must be a"),
        ("WhiteBoxPrior", {"cut_first_within": 0}, "cut_first_within=0: must be in (0, 1]"),
        ("CategoryTextRanking", {"num_candidates": 2.5}, "num_candidates=2.5: must be a whole"),
        ("ProjectionSearch", {"num_restarts": -1}, "num_restarts=-1: must be a whole number >= 0"),
        ("ProjectionSearch", {"plausible_top_k": 0}, "plausible_top_k=0: must be a whole"),
        ("CategoryTextRanking", {"nope": 2}, "unexpected keyword argument 'nope'"),
    ],
)
def test_a_bad_strategy_setting_is_named_in_one_line(name, setting, message):
    from soft_prompting.errors import ConfigError

    spec = {"_target_": f"soft_prompting.hard_prompts.strategies.{name}", **setting}
    with pytest.raises(ConfigError) as caught:
        build_strategies([spec])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_settings_that_may_be_zero_or_none_are_accepted():
    spec = "soft_prompting.hard_prompts.strategies.ProjectionSearch"
    (search,) = build_strategies([{"_target_": spec, "num_restarts": 0, "plausible_top_k": None}])
    assert search.num_restarts == 0 and search.plausible_top_k is None
