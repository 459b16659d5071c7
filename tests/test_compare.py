"""`python -m soft_prompting.compare` on a tiny pair with two categories; aggregation maths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import SMALL_STRATEGIES
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from soft_prompting.compare import bootstrap_ci, compare
from soft_prompting.config import (
    CompareConfig,
    GenerationConfig,
    ModelPairConfig,
    register_configs,
    to_train_config,
)

register_configs()
FAST = [
    "training.max_steps=2",
    "generation.num_prompts=4",
    "generation.max_length=6",
    "generation.num_generations_per_prompt=2",
    "bootstrap_samples=200",
    SMALL_STRATEGIES,
]


@pytest.fixture(scope="module")
def comparison_dir(tiny_pair_dirs, text_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("compare") / "run"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "soft_prompting.compare",
            "categories=[animals,persona]",
            f"model_pair.model_1_name={tiny_pair_dirs[0]}",
            f"model_pair.model_2_name={tiny_pair_dirs[1]}",
            f"data.text_dir={text_dir}",
            f"hydra.run.dir={run_dir}",
            *FAST,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path_factory.mktemp("elsewhere"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_both_files_are_written_with_every_category(comparison_dir):
    comparison = json.loads((comparison_dir / "comparison.json").read_text())
    assert set(comparison["categories"]) == {"animals", "persona"}
    markdown = (comparison_dir / "comparison.md").read_text()
    assert "| animals |" in markdown and "| persona |" in markdown
    assert "top examples" in markdown
    for name in ("animals", "persona"):
        summary = comparison["categories"][name]
        kl = summary["kl_divergence"]
        assert kl["n"] == summary["num_records"] == 4
        assert kl["ci_low"] <= kl["mean"] <= kl["ci_high"]
        assert summary["training"]["soft_prompt_lift"] > 0
        assert len(summary["top_examples"]) == 4
        kls = [ex["kl_divergence"] for ex in summary["top_examples"]]
        assert kls == sorted(kls, reverse=True)
        # each category's run directory is a complete train run directory
        run = comparison_dir / name
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / ".hydra" / "config.yaml").is_file()
        records = [
            json.loads(x) for x in (run / "divergent_dataset.jsonl").read_text().splitlines()
        ]
        assert {r["category"] for r in records} == {name}


def test_models_are_freed_between_jobs(comparison_dir):
    jobs = json.loads((comparison_dir / "comparison.json").read_text())["jobs"]
    assert [job["status"] for job in jobs] == ["trained", "trained"]
    assert all(job["models_alive_after_cleanup"] == 0 for job in jobs)


def test_the_installed_evaluate_stage_ran_for_every_category(comparison_dir):
    comparison = json.loads((comparison_dir / "comparison.json").read_text())
    assert [job["evaluation"]["status"] for job in comparison["jobs"]] == ["done", "done"]
    for name in ("animals", "persona"):
        assert comparison["categories"][name]["evaluation"] is not None, name


def test_a_missing_evaluate_stage_is_skipped_with_a_note(comparison_dir, tiny_pair_dirs, tmp_path):
    import dataclasses

    import soft_prompting.compare as compare_module

    job_dir = tmp_path / "animals"
    shutil.copytree(comparison_dir / "animals", job_dir)
    shutil.rmtree(job_dir / "evaluation", ignore_errors=True)  # the real evaluate ran there
    config = CompareConfig(model_pair=pair_config(tiny_pair_dirs), bootstrap_samples=200)
    missing = "soft_prompting.no_such_stage"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare_module, "EVALUATE_MODULE", missing)
        result = compare_module.run_evaluation(config, "animals", job_dir)
    assert result["status"] == "skipped" and missing in result["note"], result
    assert compare_module.find_evaluation_summary(job_dir) is None
    off = compare_module.run_evaluation(dataclasses.replace(config, evaluate=False), "a", job_dir)
    assert off == {"status": "skipped", "note": "evaluate=false"}


FAKE_EVALUATE = """
import json, pathlib, sys
args = dict(a.split("=", 1) for a in sys.argv[1:])
assert pathlib.Path(args["prompts_file"]).is_file()
assert args["model_pair.model_1_name"] and args["data.categories"]
out = pathlib.Path(args["hydra.run.dir"])
out.mkdir(parents=True)
(out / "summary.json").write_text(json.dumps({"lift": {"random_text": 3.5}, "reliability": 0.9}))
(out / "args.json").write_text(json.dumps(sys.argv[1:]))
"""


def test_the_evaluate_stage_runs_through_its_command_line_and_its_summary_is_read(
    comparison_dir, tiny_pair_dirs, tmp_path, monkeypatch
):
    import soft_prompting.compare as compare_module

    (tmp_path / "fake_evaluate.py").write_text(FAKE_EVALUATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(compare_module, "EVALUATE_MODULE", "fake_evaluate")
    job_dir = tmp_path / "animals"
    shutil.copytree(comparison_dir / "animals", job_dir)
    shutil.rmtree(job_dir / "evaluation", ignore_errors=True)  # the real evaluate ran there
    generation = GenerationConfig(
        num_prompts=3, strategies=[{"_target_": TEXT_RANKING, "num_candidates": 2}]
    )
    config = CompareConfig(
        model_pair=pair_config(tiny_pair_dirs), generation=generation, bootstrap_samples=200
    )
    assert compare_module.find_evaluation_summary(job_dir) is None
    assert compare_module.run_evaluation(config, "animals", job_dir)["status"] == "done"
    # The evaluation samples, proposes and budgets as the dataset did: its baselines match it.
    args = json.loads((job_dir / "evaluation" / "args.json").read_text())
    import soft_prompting.evaluate  # noqa: F401  (registers the evaluate schema)

    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        evaluated = compose("evaluate", overrides=args)
    assert OmegaConf.to_object(evaluated.generation) == generation
    summary = compare_module.summarise_category(
        {"category": "animals", "run_dir": str(job_dir), "status": "trained"}, config
    )
    assert summary["evaluation"]["lift/random_text"] == 3.5
    assert summary["evaluation"]["reliability"] == 0.9
    assert compare_module.run_evaluation(config, "animals", job_dir)["status"] == "reused"


TEXT_RANKING = "soft_prompting.hard_prompts.strategies.CategoryTextRanking"


def pair_config(tiny_pair_dirs) -> ModelPairConfig:
    return ModelPairConfig(model_1_name=tiny_pair_dirs[0], model_2_name=tiny_pair_dirs[1])


def test_finished_runs_are_aggregated_without_training(comparison_dir, tiny_pair_dirs, tmp_path):
    runs = [str(comparison_dir / "animals"), str(comparison_dir / "persona")]
    config = CompareConfig(model_pair=pair_config(tiny_pair_dirs), runs=runs, bootstrap_samples=200)
    comparison = compare(config, tmp_path)
    assert set(comparison["categories"]) == {"animals", "persona"}
    assert (tmp_path / "comparison.md").is_file()
    original = json.loads((comparison_dir / "comparison.json").read_text())
    assert comparison["categories"]["animals"]["kl_divergence"] == pytest.approx(
        original["categories"]["animals"]["kl_divergence"]
    )


def test_a_rerun_reuses_finished_categories(comparison_dir, tiny_pair_dirs, text_dir):
    config = to_train_config(
        compose_compare(
            [
                "categories=[animals,persona]",
                f"model_pair.model_1_name={tiny_pair_dirs[0]}",
                f"model_pair.model_2_name={tiny_pair_dirs[1]}",
                f"data.text_dir={text_dir}",
                "evaluate=false",
                *FAST,
            ]
        )
    )
    comparison = compare(config, comparison_dir)
    assert [job["status"] for job in comparison["jobs"]] == ["reused", "reused"]


def compose_compare(overrides: list[str]):
    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        return compose("compare", overrides=overrides)


def test_compare_config_composes_and_rejects_typos():
    config = to_train_config(compose_compare(["categories=[sandbagging,unlearning]"]))
    assert isinstance(config, CompareConfig)
    assert config.categories == ["sandbagging", "unlearning"]
    assert config.model_pair.model_1_name.startswith("organism:")
    with pytest.raises(Exception, match="categoriez"):
        compose_compare(["categoriez=[a]"])
    with pytest.raises(Exception, match="confidence"):
        to_train_config(compose_compare(["confidence=1.5"]))
    with pytest.raises(Exception, match="aggregate them with runs"):
        to_train_config(compose_compare(["training.strategy=fsdp"]))


def test_bootstrap_interval_of_the_mean():
    assert bootstrap_ci(np.array([2.0, 2.0, 2.0])) == (2.0, 2.0)
    assert bootstrap_ci(np.array([1.5])) == (1.5, 1.5)
    rng = np.random.default_rng(1)
    values = rng.normal(10.0, 1.0, size=400)
    low, high = bootstrap_ci(values, confidence=0.95, samples=2000, seed=0)
    # The normal-theory interval of the mean: mean ± 1.96 s / sqrt(n).
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.03)
    assert high == pytest.approx(values.mean() + half, abs=0.03)
    assert bootstrap_ci(values, seed=0) == bootstrap_ci(values, seed=0)


def test_top_k_lift_divides_by_the_other_records_not_by_all():
    from soft_prompting.compare import top_k_lift

    # Top 2 of [4, 4, 1, 1]: 4 / 1, not 4 / 2.5 (dividing by all records, the top-k included).
    assert top_k_lift([1.0, 4.0, 1.0, 4.0], top_k=2) == pytest.approx(4.0)
    # Equal KLs everywhere: no lift at all (the old formula could never go below 1 either).
    assert top_k_lift([0.5, 0.5, 0.5], top_k=1) == pytest.approx(1.0)
    assert top_k_lift([0.5, 0.5], top_k=2) is None  # nothing left to compare with
