"""Hydra sweeps of the train entrypoint: multirun, the Optuna preset with a storage, the submitit
launcher (its local executor), and jobs that free their models and close their W&B run."""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import shlex
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from helpers import run_main
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

from soft_prompting.config import register_configs

register_configs()

README = Path(__file__).resolve().parents[1] / "README.md"


def tiny_overrides(tiny_pair_dirs, text_dir) -> list[str]:
    """A run of a few seconds on the tiny pair."""
    return [
        "model_pair=custom",
        f"model_pair.model_1_name={tiny_pair_dirs[0]}",
        f"model_pair.model_2_name={tiny_pair_dirs[1]}",
        f"data.text_dir={text_dir}",
        "data.max_texts_per_category=12",
        "training.batch_size=4",
        "training.max_steps=2",
        "training.accelerator=cpu",
        "write_dataset=false",
    ]


def multirun(
    sweep_dir: Path, overrides: list[str], succeeds: bool = True
) -> subprocess.CompletedProcess:
    """``python -m soft_prompting.train -m`` into ``sweep_dir``, in this process; asserts its exit
    status was 0 (or, with ``succeeds=False``, was not)."""
    args = ["-m", f"hydra.sweep.dir={sweep_dir}", *overrides]
    result = run_main("soft_prompting.train", args, sweep_dir.parent, {"OMP_NUM_THREADS": "1"})
    assert (result.returncode == 0) == succeeds, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def job_results(sweep_dir: Path) -> dict[int, dict]:
    """Per job number: its soft prompt's shape and its metrics."""
    results = {}
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        ckpt = torch.load(metrics_file.parent / "checkpoints" / "last.ckpt", weights_only=True)
        results[int(metrics_file.parent.name)] = {
            "shape": tuple(ckpt["state_dict"]["soft_prompt"].shape),
            "metrics": json.loads(metrics_file.read_text()),
        }
    return results


def compose_hydra(overrides: list[str]):
    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    ("override", "target"),
    [
        ("hydra/launcher=slurm", "SlurmLauncher"),
        ("hydra/launcher=submitit_slurm", "SlurmLauncher"),
        ("hydra/launcher=submitit_local", "LocalLauncher"),
        ("hparams_search=optuna", "OptunaSweeper"),
    ],
)
def test_sweep_presets_compose(override, target):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_hydra([override])
    node = cfg.hydra.sweeper if "sweeper" in target.lower() else cfg.hydra.launcher
    assert node._target_.endswith(target)
    if override == "hparams_search=optuna":
        assert cfg.hydra.sweeper.direction == "maximize"
        assert set(cfg.hydra.sweeper.params) == {
            "training.num_soft_prompt_tokens",
            "training.learning_rate",
        }


def test_optuna_without_maximize_stops_before_training(tmp_path):
    """hydra/sweeper=optuna alone would minimise the divergence: refused, with the fix."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    overrides = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=1"]
    result = multirun(tmp_path, overrides, succeeds=False)
    assert result.returncode == 2
    assert "hydra.sweeper.direction=maximize" in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_other_jobs_of_a_sweep(tiny_pair_dirs, text_dir, tmp_path):
    overrides = tiny_overrides(tiny_pair_dirs, text_dir) + ["training.num_soft_prompt_tokens=0,2"]
    result = multirun(tmp_path, overrides, succeeds=False)  # the sweep reports the failed job ...
    assert "training.num_soft_prompt_tokens=0: needs at least 1" in result.stderr
    assert not (tmp_path / "0" / "checkpoints").exists()
    # ... after the job behind it ran to the end.
    assert job_results(tmp_path)[1]["shape"] == (2, 32)


@pytest.mark.slow
def test_multirun_trains_one_prompt_per_sweep_point(tiny_pair_dirs, text_dir, tmp_path):
    overrides = tiny_overrides(tiny_pair_dirs, text_dir) + ["training.num_soft_prompt_tokens=2,4"]
    multirun(tmp_path, overrides)
    results = job_results(tmp_path)
    assert {job: r["shape"] for job, r in results.items()} == {0: (2, 32), 1: (4, 32)}
    assert all(r["metrics"]["val/divergence"] > 0 for r in results.values())


@pytest.mark.slow
def test_optuna_sweep_keeps_its_study_in_the_storage(tiny_pair_dirs, text_dir, tmp_path):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = tiny_overrides(tiny_pair_dirs, text_dir) + [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        "name=tiny_study",
    ]
    multirun(tmp_path / "sweep", overrides)
    study = optuna.load_study(study_name="tiny_study", storage=storage)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 2
    results = job_results(tmp_path / "sweep")
    # Each trial's value is what its job's train entrypoint returned: val/divergence.
    assert sorted(t.value for t in trials) == pytest.approx(
        sorted(r["metrics"]["val/divergence"] for r in results.values())
    )
    assert {r["shape"][0] for r in results.values()} <= {4, 8, 16}
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


@pytest.mark.parametrize("config_name", ["train", "compare"])
def test_the_sweep_dir_resolves_before_hydra_config_is_set_and_not_per_job(config_name):
    """A sweeper reads hydra.sweep.dir before Hydra sets HydraConfig, so it must not need the
    ``${hydra:...}`` resolver (that failed every multirun without hydra.sweep.dir=...); and each
    job resolves it again with its own overrides, so it must not name the model pair (a sweep
    over model_pair would put each job in another folder)."""
    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        cfg = compose(config_name, overrides=["model_pair=toy_double"], return_hydra_config=True)
    assert not HydraConfig.initialized()
    assert re.fullmatch(r"multirun/(compare/)?[0-9_-]+", cfg.hydra.sweep.dir)


def readme_sweep_commands() -> list[str]:
    """The README's sweep commands as it prints them: the block, the Optuna preset with a storage
    and the local submitit launcher (the last two are printed as arguments of the first)."""
    section = README.read_text().split("## Sweeps", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1)
    optuna = "-m hparams_search=optuna hydra.sweeper.storage=sqlite:///optuna.db"
    submitit = "hydra/launcher=submitit_local"
    assert f"`{optuna}`" in section and f"`{submitit}`" in section, "the README changed"
    return [
        block,
        f"python -m soft_prompting.train {optuna}",
        f"python -m soft_prompting.train -m {submitit}",
    ]


@pytest.mark.slow
def test_the_readme_sweep_commands_run_as_printed(tiny_pair_dirs, text_dir, tmp_path):
    """From a fresh working directory, without hydra.sweep.dir: only the tiny pair, one step and
    one Optuna trial are appended."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cheap = tiny_overrides(tiny_pair_dirs, text_dir) + ["training.max_steps=1"]
    jobs = []
    for command in readme_sweep_commands():
        args = shlex.split(command) + cheap
        if "hparams_search=optuna" in command:
            args.append("hydra.sweeper.n_trials=1")
        if "submitit" in command:  # two jobs, each in a process of the launcher's own
            args.append("training.num_soft_prompt_tokens=2,3")
        assert args[0] == "python" and not any(a.startswith("hydra.sweep.dir") for a in args)
        before = set(tmp_path.glob("multirun/*"))
        if "submitit" in command:  # the launcher's own processes, from a process as users run it
            result = subprocess.run(
                [sys.executable, *args[1:]],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=400,
            )
        else:  # `python -m soft_prompting.train ARGS`, in this process: no interpreter start-up
            assert args[1:3] == ["-m", "soft_prompting.train"]
            result = run_main("soft_prompting.train", args[3:], tmp_path, {"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, command + "\n" + result.stderr[-3000:]
        (sweep_dir,) = set(tmp_path.glob("multirun/*")) - before
        jobs.append(sorted(job_results(sweep_dir).items()))
    grid, optuna, submitit = jobs
    assert [(job, r["shape"][0]) for job, r in grid] == list(enumerate([4, 4, 8, 8, 16, 16]))
    assert len(optuna) == 1 and (tmp_path / "optuna.db").is_file()
    assert [(job, r["shape"]) for job, r in submitit] == [(0, (2, 32)), (1, (3, 32))]
    assert (sweep_dir / ".submitit").is_dir()


def run_job_in_process(overrides: list[str], run_dir: Path) -> float:
    """One job the way Hydra's basic launcher runs it: in this process, after the previous one."""
    from soft_prompting import train as train_entrypoint

    cfg = compose_hydra(overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    task_cfg = copy.deepcopy(cfg)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    try:
        return train_entrypoint.main(task_cfg)
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
def test_each_job_frees_its_models_and_closes_its_wandb_run(
    tiny_pair_dirs, text_dir, tmp_path, monkeypatch
):
    wandb = pytest.importorskip("wandb")
    from soft_prompting.pair.loading import ModelPairManager

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    loaded = []
    original_load = ModelPairManager._load

    def recording_load(self, *args):
        pair = original_load(self, *args)
        loaded.append(weakref.ref(pair.model_1))
        return pair

    monkeypatch.setattr(ModelPairManager, "_load", recording_load)
    ModelPairManager.clear_cache()  # pairs cached by earlier tests would not be loaded again
    runs = []
    original_init = wandb.init
    monkeypatch.setattr(
        wandb, "init", lambda *a, **k: runs.append(original_init(*a, **k)) or runs[-1]
    )
    for tokens in (2, 3):
        overrides = tiny_overrides(tiny_pair_dirs, text_dir) + [
            f"training.num_soft_prompt_tokens={tokens}",
            "wandb.enabled=true",
            "wandb.mode=offline",
        ]
        run_job_in_process(overrides, tmp_path / f"job_{tokens}")
        gc.collect()
        assert wandb.run is None, "the job's W&B run must be finished before the next job"
        assert ModelPairManager._cache == {}
        assert all(ref() is None for ref in loaded), "the job's models must be freed"
        assert len(list((tmp_path / f"job_{tokens}" / "wandb").glob("offline-run-*"))) == 1
    assert len(loaded) == 2  # the second job loaded its own pair
    assert len(runs) == 2 and runs[0].id != runs[1].id  # no job logged into another's run
    assert [run.config["training"]["num_soft_prompt_tokens"] for run in runs] == [2, 3]
