"""BehavioralClusteringAnalyzer: separates obviously different groups, says so when data is thin."""

from __future__ import annotations

import json

import numpy as np
import pytest

from soft_prompting.analysis.clustering import (
    BehavioralClusteringAnalyzer,
    first_disagreement,
    load_clustering_config,
    purity,
)
from soft_prompting.errors import ConfigError

NUMBERS = "one two three four five six seven eight nine ten".split()
ELEMENTS = "gold oxygen water iron carbon neon sodium zinc copper helium".split()


def arithmetic(i: int) -> dict:
    a, b = NUMBERS[i % 10], NUMBERS[(i + 3) % 10]
    return {
        "prompt": f"what is {a} plus {b}",
        "generation_1": f"{a} plus {b} equals {NUMBERS[(i + 4) % 10]}",
        "generation_2": f"{a} plus {b} equals {NUMBERS[(i + 5) % 10]}",
        "category": "sandbagging",
        "source": "category_text",
        "metrics": {"kl_divergence": 2.0 + 0.01 * i, "token_disagreement_rate": 0.4},
    }


def chemistry(i: int) -> dict:
    element = ELEMENTS[i % 10]
    return {
        "prompt": f"what is the symbol for {element}",
        "generation_1": f"the symbol for {element} is {element[:2]}",
        "generation_2": "i do not know",
        "category": "unlearning",
        "source": "category_text",
        "metrics": {"kl_divergence": 5.0 + 0.01 * i, "token_disagreement_rate": 0.9},
    }


def two_groups(n: int) -> tuple[list[dict], np.ndarray]:
    records = [arithmetic(i) for i in range(n)] + [chemistry(i) for i in range(n)]
    return records, np.array([0] * n + [1] * n)


def assert_separated(labels, truth) -> None:
    from sklearn.metrics import adjusted_rand_score

    labels = np.asarray(labels)
    assert (labels >= 0).all(), labels
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0), labels


def test_kmeans_on_text_features_separates_two_behaviours(tmp_path):
    records, truth = two_groups(10)
    result = BehavioralClusteringAnalyzer(
        output_dir=tmp_path, reducer="pca", method="kmeans", n_clusters=2, progress=False
    ).analyze_divergent_behaviors(records)
    assert result["embedding"] == "tfidf"
    assert result["num_clusters"] == 2
    assert_separated(result["assignments"], truth)
    by_category = {tuple(c["categories"]): c for c in result["clusters"]}
    unlearning = by_category[("unlearning",)]
    assert unlearning["size"] == 10
    assert unlearning["metrics"]["kl_divergence"]["mean"] == pytest.approx(5.045)
    assert {"know", "symbol"} & set(unlearning["distinguishing_words"])
    assert "plus" in by_category[("sandbagging",)]["distinguishing_words"]
    assert len(unlearning["examples"]) == 3


def test_kmeans_choosing_k_never_mixes_the_two_behaviours():
    records, truth = two_groups(10)
    result = BehavioralClusteringAnalyzer(
        reducer="pca", method="kmeans", progress=False
    ).analyze_divergent_behaviors(records)
    labels = np.asarray(result["assignments"])
    assert result["num_clusters"] >= 2
    for label in set(labels.tolist()):  # it may split a behaviour further, never merge two
        assert len(set(truth[labels == label].tolist())) == 1


def test_hdbscan_on_given_embeddings_separates_two_blobs():
    rng = np.random.default_rng(0)
    embeddings = np.concatenate([rng.normal(0, 0.1, (15, 8)), rng.normal(5, 0.1, (15, 8))])
    records = [arithmetic(i) for i in range(15)] + [chemistry(i) for i in range(15)]
    result = BehavioralClusteringAnalyzer(
        reducer="none", progress=False
    ).analyze_divergent_behaviors(records, embeddings=embeddings)
    assert result["method"] == "hdbscan" and result["embedding"] == "precomputed"
    assert_separated(result["assignments"], np.array([0] * 15 + [1] * 15))


@pytest.mark.slow
def test_umap_then_hdbscan_separates_two_behaviours(tmp_path):
    pytest.importorskip("umap", reason="umap-learn is in the analysis extra")
    records, truth = two_groups(15)
    result = BehavioralClusteringAnalyzer(
        output_dir=tmp_path, min_cluster_size=5, progress=False
    ).analyze_divergent_behaviors(records)
    assert result["reducer"] == "umap"
    assert_separated(result["assignments"], truth)
    assert result["silhouette"] > 0.5


def test_outputs_are_written(tmp_path):
    records, _ = two_groups(6)
    result = BehavioralClusteringAnalyzer(
        output_dir=tmp_path, reducer="pca", method="kmeans", n_clusters=2, progress=False
    ).analyze_divergent_behaviors(records)
    rows = [json.loads(line) for line in (tmp_path / "clusters.jsonl").read_text().splitlines()]
    assert [row["cluster"] for row in rows] == result["assignments"]
    assert {"index", "x", "y", "category", "kl_divergence", "prompt"} <= set(rows[0])
    summary = json.loads((tmp_path / "clusters_summary.json").read_text())
    assert summary["num_clusters"] == 2
    assert (tmp_path / "clusters.png").stat().st_size > 1000


@pytest.mark.parametrize("n", [0, 1, 2])
def test_a_handful_of_examples_does_not_crash(n, tmp_path):
    records = [arithmetic(i) for i in range(n)]
    result = BehavioralClusteringAnalyzer(
        output_dir=tmp_path, progress=False
    ).analyze_divergent_behaviors(records)
    assert result["num_records"] == n
    assert len(result["assignments"]) == n
    if n:
        assert any("too few" in note for note in result["notes"])


def test_too_few_for_umap_falls_back_to_pca_and_says_so():
    records, _ = two_groups(3)
    result = BehavioralClusteringAnalyzer(progress=False).analyze_divergent_behaviors(records)
    assert result["reducer"] == "pca"
    assert any("too few for UMAP" in note for note in result["notes"])


def test_settings_come_from_a_yaml_file_and_typos_fail(tmp_path):
    config = tmp_path / "experiment.yaml"
    config.write_text("name: x\nclustering:\n  method: kmeans\n  n_clusters: 3\n")
    loaded = load_clustering_config(config, seed=4)
    assert (loaded.method, loaded.n_clusters, loaded.seed) == ("kmeans", 3, 4)
    flat = tmp_path / "flat.yaml"
    flat.write_text("reducer: pca\n")
    assert BehavioralClusteringAnalyzer(config_path=flat).config.reducer == "pca"
    typo = tmp_path / "typo.yaml"
    typo.write_text("clustering:\n  methd: kmeans\n")
    with pytest.raises(Exception, match="methd"):
        load_clustering_config(typo)
    with pytest.raises(ConfigError, match="method"):
        BehavioralClusteringAnalyzer(method="dbscan")


def alike_prompts(n: int) -> tuple[list[dict], np.ndarray]:
    """Two behaviours drawn by the same prompts: on half the questions model_2 answers "i do not
    know", on the other half a different number; the prompts alone cannot tell them apart."""
    records, truth = [], []
    for i in range(2 * n):
        behaviour = i % 2
        thing = ELEMENTS[(i // 2) % 10]
        answer = str(10 + i)
        records.append(
            {
                "prompt": f"question : what can you tell me about {thing} number {i % 3} ? answer :",
                "generation_1": f"{answer} . question : what is next ?",
                "generation_2": f"{int(answer) + 1} . question : what is next ?"
                if behaviour
                else "i do not know . question : who knows ?",
                "category": "mixed",
                "metrics": {"kl_divergence": 1.0 + 0.01 * i},
            }
        )
        truth.append(behaviour)
    return records, np.array(truth)


def test_default_features_separate_behaviours_that_prompts_do_not():
    records, truth = alike_prompts(10)
    settings = {"reducer": "pca", "method": "kmeans", "n_clusters": 2, "progress": False}
    default = BehavioralClusteringAnalyzer(**settings).analyze_divergent_behaviors(records)
    assert default["config"]["features"] == "disagreement"
    assert_separated(default["assignments"], truth)
    on_prompts = BehavioralClusteringAnalyzer(features="prompt", **settings)
    labels = on_prompts.analyze_divergent_behaviors(records)["assignments"]
    assert purity(labels, truth) < 0.8, labels


def test_first_disagreement_is_the_span_where_the_models_part():
    assert first_disagreement("12 . question : what is", "11 . question : who is") == ("12", "11")
    assert first_disagreement("he .", "i do not know . question") == ("he", "i do not know")
    assert first_disagreement("same words", "same words") == ("", "")
    assert first_disagreement("a b", "a b c d") == ("", "c d")


def test_purity_counts_each_clusters_majority():
    truth = np.array(["a", "a", "b", "b"])
    assert purity([0, 0, 1, 1], truth) == 1.0
    assert purity([0, 0, 0, 0], truth) == 0.5
    assert purity([0, 1, 0, 1], truth) == 0.5
