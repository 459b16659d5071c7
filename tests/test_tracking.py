"""ExperimentTracker: offline W&B runs hold what was logged; disabled runs touch nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soft_prompting.config import WandbConfig
from soft_prompting.tracking import ExperimentTracker, plain_config, wandb_mode

RECORD = {
    "prompt": "what is two plus three",
    "generation_1": "five",
    "generation_2": "six",
    "category": "sandbagging",
    "source": "category_text",
    "metrics": {
        "kl_divergence": 2.5,
        "token_disagreement_rate": 1.0,
        "reliability": 1.0,
        "disagreement_positions": {"first": 0, "last": 0, "count": 1, "length": 1},
    },
}


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc either


def finished_run_dir(root: Path) -> Path:
    run = root / "run"
    (run / "soft_prompt").mkdir(parents=True)
    (run / "soft_prompt" / "adapter_config.json").write_text("{}")
    (run / "soft_prompt" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (run / "metrics.json").write_text(
        json.dumps({"val/divergence": 0.5, "environment": {"a": "b"}})
    )
    (run / "divergent_dataset.jsonl").write_text(json.dumps(RECORD) + "\n")
    return run


def test_without_an_api_key_the_mode_is_offline(no_key):
    assert wandb_mode(WandbConfig()) == "offline"
    assert wandb_mode(WandbConfig(mode="disabled")) == "disabled"


def test_disabled_tracker_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = finished_run_dir(tmp_path)
    with ExperimentTracker(
        config={"name": "x"}, use_wandb=True, run_dir=tmp_path / "wb"
    ) as tracker:
        assert tracker.mode == "disabled" and not tracker.enabled
        tracker.log_metrics({"a": 1.0})
        tracker.log_dataset([RECORD])
        assert tracker.log_run_dir(run) == []
        assert tracker.lightning_logger() is None
    assert not (tmp_path / "wb").exists()
    assert ExperimentTracker(use_wandb=False).mode == "disabled"


def test_offline_tracker_logs_config_metrics_table_and_artifacts(no_key, monkeypatch, tmp_path):
    """What reaches W&B is read through its public API: the calls the run receives, its summary and
    config, and its files folder (never W&B's binary ``.wandb`` log, whose format is private)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = finished_run_dir(tmp_path)
    tracker = ExperimentTracker(
        config={"name": "tracked", "training": {"learning_rate": 0.03}},
        use_wandb=True,
        project_name="soft-prompting-test",
        run_dir=tmp_path / "wb",
    )
    logged_data, artifacts = [], []
    log, log_artifact = tracker.run.log, tracker.run.log_artifact

    def spy_log(data, *args, **kwargs):
        logged_data.append((dict(data), kwargs.get("step")))
        return log(data, *args, **kwargs)

    def spy_log_artifact(artifact, *args, **kwargs):
        artifacts.append((artifact.name, artifact.type, sorted(artifact.manifest.entries)))
        return log_artifact(artifact, *args, **kwargs)

    monkeypatch.setattr(tracker.run, "log", spy_log)
    monkeypatch.setattr(tracker.run, "log_artifact", spy_log_artifact)
    try:
        assert tracker.mode == "offline" and tracker.enabled
        assert tracker.run.config["training"]["learning_rate"] == 0.03
        # The Lightning logger of training writes into this very run.
        assert tracker.lightning_logger().experiment is tracker.run
        logged = tracker.log_run_dir(run)
        assert logged == ["metrics", "dataset_table", "dataset_artifact", "soft_prompt"]
        tracker.log_metrics({"val": {"divergence_no_prompt": 0.2}}, step=1)
        assert tracker.run.summary["val/divergence"] == 0.5
    finally:
        tracker.finish()

    metrics, table, nested = logged_data
    # Numbers only: metrics.json's nested strings (the environment) are not metrics.
    assert metrics == ({"val/divergence": 0.5}, None)
    assert nested == ({"val/divergence_no_prompt": 0.2}, 1)
    [(name, rows)] = table[0].items()
    assert name == "divergent_dataset"
    assert dict(zip(rows.columns, rows.data[0], strict=True)) == {
        "prompt": "what is two plus three",
        "generation_1": "five",
        "generation_2": "six",
        "category": "sandbagging",
        "source": "category_text",
        "kl_divergence": 2.5,
        "token_disagreement_rate": 1.0,
        "vocab_jaccard_similarity": None,
        "reliability": 1.0,
        "first_disagreement": 0,
    }
    # (W&B may store the table as a run_table artifact of its own.)
    assert [a for a in artifacts if a[1] != "run_table"] == [
        ("divergent_dataset", "dataset", ["divergent_dataset.jsonl"]),
        ("soft_prompt", "model", ["adapter_config.json", "adapter_model.safetensors"]),
    ]
    # The offline run is on disk, waiting for `wandb sync`, with the table among its files.
    [offline_run] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    tables = list((offline_run / "files").rglob("divergent_dataset*.table.json"))
    assert tables and "what is two plus three" in tables[0].read_text()


def test_configs_become_plain_dicts(tmp_path):
    yaml = tmp_path / "experiment.yaml"
    yaml.write_text("name: x\ntraining:\n  batch_size: 4\n")
    assert plain_config(yaml) == {"name": "x", "training": {"batch_size": 4}}
    assert plain_config(WandbConfig())["project"] == "soft-prompting"
    assert plain_config(None) == {}
    with pytest.raises(TypeError):
        plain_config(3)
