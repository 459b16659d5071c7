"""``python -m soft_prompting.evaluate``: prompts files, baselines, lift and reliability."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_entrypoint
from helpers import run_main

from soft_prompting.errors import ConfigError, DataError
from soft_prompting.evaluate import EvaluateConfig, is_discovery, lift, read_prompts


def run_evaluate(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The entrypoint in this process (fast); ``run_entrypoint`` gives it a process of its own."""
    return run_main("soft_prompting.evaluate", args, cwd)


def pair_args(tiny_pair_dirs, text_dir) -> list[str]:
    return [
        f"model_pair.model_1_name={tiny_pair_dirs[0]}",
        f"model_pair.model_2_name={tiny_pair_dirs[1]}",
        f"data.text_dir={text_dir}",
        "generation.max_length=4",
        "generation.num_generations_per_prompt=2",
        "confirm_generations=6",
        "baseline_candidates=4",
        "bootstrap_resamples=200",
        # A small pipeline for the untrained-pipeline baseline: the tests stay fast.
        "generation.strategies=[{_target_: soft_prompting.hard_prompts.strategies."
        "CategoryTextRanking, num_candidates: 2}, {_target_: soft_prompting.hard_prompts."
        "strategies.ProjectionSearch, num_steps: 1, search_batch: 4, num_candidates: 2}]",
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".pt", ".txt"])
def test_prompts_files_of_every_kind_are_read(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    records = [{"prompt": "the cat sat", "category": "animals", "source": "x"}, {"text": "i am"}]
    if suffix == ".txt":
        path.write_text("the cat sat\n\ni am\n")
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        torch.save(records, path)
    assert [r["prompt"] for r in read_prompts(path)] == ["the cat sat", "i am"]


@pytest.mark.parametrize(
    "content, message",
    [("", "holds no prompts"), ('{"nope": 1}\n', "no non-empty 'prompt'"), ("{bad\n{x\n", "JSON")],
)
def test_empty_or_malformed_prompts_file_is_a_data_error(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_dataset_records_keep_their_selection_score_as_pre_score(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "a b", "metrics": {"kl_divergence": 0.7}, "pre_score": 0.1},
        {"prompt": "c d", "pre_score": 0.3},
        {"prompt": "e f"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert [r["pre_score"] for r in read_prompts(path)] == [0.7, 0.3, None]


def test_lift_and_discovery_need_significance_and_an_effect_above_every_baseline():
    assert lift(0.6, 0.2) == pytest.approx(3.0)
    assert lift(0.0, 0.0) is None  # identical models: no baseline to beat, no lift claimed
    record = {"q_value": 0.01, "effect": {"value": 2.0, "ci_low": 1.5, "ci_high": 2.5}}
    assert is_discovery(record, 0.05, effect_threshold=1.0)
    assert not is_discovery(record, 0.05, effect_threshold=1.6)  # CI reaches below a baseline
    assert not is_discovery({**record, "q_value": 0.06}, 0.05, effect_threshold=1.0)
    assert not is_discovery(record, 0.05, effect_threshold=None)  # no baseline run: no claim


@pytest.mark.parametrize(
    "override, message",
    [
        ({"baselines": ["random_soft_prompt"]}, "unknown"),
        ({"confirm_generations": 1}, "confirm_generations"),
        ({"fdr_level": 1.5}, "fdr_level"),
    ],
)
def test_bad_evidence_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(prompts_file="x.txt", **override)


def test_evaluate_cli_writes_evidence_and_resumes(tiny_pair_dirs, text_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on\ni am a helpful\nwhat is one plus\n")
    (tmp_path / ".hydra").mkdir()  # as if a run of seed 7 had written the prompts
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 7\n")
    run_dir = tmp_path / "evaluation"
    args = [
        *pair_args(tiny_pair_dirs, text_dir),
        f"prompts_file={prompts}",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_entrypoint("soft_prompting.evaluate", args, cwd=tmp_path)  # as a user runs it
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_prompts"] == 3 and summary["fdr_level"] == 0.05
    assert set(summary["baselines"]) == {"text_ranking", "untrained_pipeline", "random_text_cut"}
    for name, baseline in summary["baselines"].items():
        assert baseline["num_prompts"] <= 3
        ratio = summary["lifts"][name]
        assert ratio["value"] == pytest.approx(
            summary["prompts"]["kl_divergence"] / baseline["kl_divergence"]
        )
        assert ratio["ci_low"] <= ratio["value"] <= ratio["ci_high"]
    assert "q_value" in summary["discovery_rule"]
    assert 0 <= summary["reliability"] <= 1
    records = [json.loads(line) for line in (run_dir / "evaluated_prompts.jsonl").open()]
    assert sorted(r["prompt"] for r in records) == sorted(prompts.read_text().split("\n")[:3])
    for r in records:
        assert {"pre_score", "p_value", "q_value", "effect", "discovery"} <= set(r)
        assert len(r["paired_samples"]["llr_gap"]) == 6  # the fresh confirmation samples
        assert r["q_value"] >= r["p_value"]
    assert summary["num_discoveries"] == sum(r["discovery"] for r in records)
    assert "discoveries at FDR 0.05" in (run_dir / "evaluation.md").read_text()
    assert summary["matched_to_run"]["differ"] == {"seed": {"evaluate": 0, "run": 7}}
    assert "pass the run's values: seed=7" in result.stdout + result.stderr
    assert (
        "not matched to the prompts' run**: `seed` 0 (run: 7)"
        in (run_dir / "evaluation.md").read_text()
    )
    assert (run_dir / "baseline_prompts.jsonl").is_file()
    assert not list(run_dir.glob("*.partial.jsonl"))


def test_identical_models_give_no_discovery_and_reliability_zero(
    tiny_pair_dirs, text_dir, tmp_path
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on\nwhat is one plus\n")
    run_dir = tmp_path / "evaluation"
    identical = (tiny_pair_dirs[0], tiny_pair_dirs[0])
    args = [
        *pair_args(identical, text_dir),
        "baselines=[random_text_cut]",
        f"prompts_file={prompts}",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_evaluate(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_discoveries"] == 0 and summary["reliability"] == 0.0
    records = [json.loads(line) for line in (run_dir / "evaluated_prompts.jsonl").open()]
    assert all(r["p_value"] == 1.0 and r["effect"]["value"] == 0.0 for r in records)
    assert summary["lifts"]["random_text_cut"]["value"] is None  # nothing to divide by


def test_evaluate_cli_rejects_an_empty_prompts_file(tiny_pair_dirs, text_dir, tmp_path):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n\n")
    args = [
        *pair_args(tiny_pair_dirs, text_dir),
        f"prompts_file={prompts}",
        f"hydra.run.dir={tmp_path / 'e'}",
    ]
    result = run_evaluate(args, cwd=tmp_path)
    assert result.returncode == 2
    assert "holds no prompts" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_cli_needs_a_prompts_file(tmp_path):
    result = run_evaluate([f"hydra.run.dir={tmp_path / 'e'}"], cwd=tmp_path)
    assert result.returncode == 2 and "prompts_file" in result.stderr


def test_the_baselines_start_from_the_texts_the_runs_strategies_started_from(
    tiny_pair_dirs, text_dir, tmp_path, monkeypatch
):
    """A selection-matched baseline starts where the run did: the run's seeded split of the
    texts, ``data.max_texts_per_category`` of them, cut to the training length (evaluate once
    drew from every text of the folder, in file order, uncut)."""
    import soft_prompting.hard_prompts.strategies as strategies

    seen = []

    def spy(strategy_list, module, texts_by_category, *args, **kwargs):
        seen.append(texts_by_category)
        return propose(strategy_list, module, texts_by_category, *args, **kwargs)

    propose = strategies.propose_candidates
    monkeypatch.setattr(strategies, "propose_candidates", spy)
    same = [
        "seed=3",
        "data.max_texts_per_category=5",
        "data.max_length=6",
        "generation.num_prompts=2",
    ]
    shared = pair_args(tiny_pair_dirs, text_dir)
    train = run_main(
        "soft_prompting.train",
        [
            *shared[:5],  # the pair, the texts and the sampling
            shared[-1],  # the small strategy list
            *same,
            "training.max_steps=1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    (run_texts,) = seen
    evaluate = run_evaluate(
        [
            *pair_args(tiny_pair_dirs, text_dir),
            *same,
            "baselines=[text_ranking,random_text_cut]",
            f"prompts_file={tmp_path / 'run' / 'divergent_dataset.jsonl'}",
            f"hydra.run.dir={tmp_path / 'evaluation'}",
        ],
        tmp_path,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert len(seen) == 3 and all(texts == run_texts for texts in seen[1:])
    assert {len(texts) for texts in run_texts.values()} == {5}
    # Given the run's settings, evaluate finds nothing to warn about in the run's config.
    summary = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert summary["matched_to_run"] == {
        "run_config": str(tmp_path / "run" / ".hydra" / "config.yaml"),
        "differ": {},
        "unchecked": [],
    }
    assert "differ from the run" not in evaluate.stdout + evaluate.stderr


def test_evaluate_names_every_setting_that_differs_from_the_prompts_run_and_the_fix(
    tmp_path, caplog
):
    """Baselines match the prompts only with the run's seed, texts and selection settings; a
    mismatch is named with the overrides that fix it, and kept in the summary."""
    from omegaconf import OmegaConf

    from soft_prompting.config import TrainConfig
    from soft_prompting.evaluate import differences_from_run

    # As Hydra saves it: interpolations unresolved, inside lists too.
    run = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
    run.model_pair.model_1_name, run.model_pair.model_2_name = "organism:base", "organism:both"
    run.seed, run.data.max_length, run.data.categories = 3, 32, ["${first}", "persona"]
    run.first = "math"
    run.data.hf_text_field = "${oc.env:SOFT_PROMPTING_TEST_NEVER_SET}"  # not resolvable here
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(run, tmp_path / ".hydra" / "config.yaml")
    prompts = tmp_path / "divergent_dataset.jsonl"
    config = EvaluateConfig(prompts_file=str(prompts))
    config.model_pair.model_1_name, config.model_pair.model_2_name = (
        "organism:base",
        "organism:both",
    )
    matched = differences_from_run(config)
    assert matched["differ"] == {
        "seed": {"evaluate": 0, "run": 3},
        "data.categories": {"evaluate": None, "run": ["math", "persona"]},
        "data.max_length": {"evaluate": 64, "run": 32},
    }
    assert matched["unchecked"] == ["data.hf_text_field"]
    (line,) = [r.getMessage() for r in caplog.records if "differ from the run" in r.getMessage()]
    assert "seed=0 (run: 3)" in line
    assert line.endswith("seed=3 data.categories=['math','persona'] data.max_length=32")
    config.seed, config.data.max_length, config.data.categories = 3, 32, ["math", "persona"]
    assert differences_from_run(config)["differ"] == {}
    assert differences_from_run(EvaluateConfig(prompts_file="elsewhere/prompts.txt")) == {
        "run_config": None,
        "differ": {},
        "unchecked": [],
    }


def test_ctrl_c_during_evaluate_says_how_to_go_on_and_keeps_the_scored_prompts(
    tiny_pair_dirs, text_dir, tmp_path, monkeypatch
):
    import soft_prompting.evaluate as evaluate_module

    def interrupted(*args, **kwargs):  # Ctrl+C once the prompts are scored, in the baselines
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "baseline_texts", interrupted)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on\nwhat is one plus\n")
    run_dir = tmp_path / "evaluation"
    args = [f"prompts_file={prompts}", f"hydra.run.dir={run_dir}"]
    try:
        result = run_evaluate([*pair_args(tiny_pair_dirs, text_dir), *args], tmp_path)
    except KeyboardInterrupt:
        pytest.fail("Ctrl+C escaped evaluate as a traceback")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "evaluate interrupted (Ctrl+C)" in line and f"hydra.run.dir={run_dir}" in line
    kept = (run_dir / "evaluated_prompts.partial.jsonl").read_text().splitlines()
    assert sum('"prompt": ' in line for line in kept) == 2


def test_one_folder_written_two_ways_is_the_same_setting(tmp_path, monkeypatch):
    """``texts`` in the run (started in its folder) and the absolute path in evaluate are one
    folder; ``texts`` from another working directory is another one."""
    from omegaconf import OmegaConf

    from soft_prompting.evaluate import differences_from_run

    started, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for folder in (started / "texts", elsewhere / "texts"):
        folder.mkdir(parents=True)
    run = started / "outputs" / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save({"data": {"text_dir": "texts"}}, run / ".hydra" / "config.yaml")
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(started)}}}, run / ".hydra" / "hydra.yaml")
    config = EvaluateConfig(prompts_file=str(run / "divergent_dataset.jsonl"))
    config.data.text_dir = str(started / "texts")
    assert differences_from_run(config)["differ"] == {}
    monkeypatch.chdir(started)
    config.data.text_dir = "./texts/"
    assert differences_from_run(config)["differ"] == {}
    monkeypatch.chdir(elsewhere)  # the same string names another folder here
    config.data.text_dir = "texts"
    assert differences_from_run(config)["differ"] == {
        "data.text_dir": {"evaluate": "texts", "run": "texts"}
    }
