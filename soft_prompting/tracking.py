"""Experiment tracking: Lightning's CSV logger always, Weights & Biases when enabled.

W&B runs offline when no API key is configured (``wandb sync`` uploads them later), so a run never
hangs waiting for a login. Secrets are never written: the config logged is the run's config, which
holds no key.

:class:`ExperimentTracker` is the documented Python face of the same W&B run::

    tracker = ExperimentTracker(config=config, use_wandb=True, project_name="soft-prompting")
    trainer = pl.Trainer(logger=tracker.lightning_logger(), ...)   # the training run is this run
    tracker.log_run_dir("outputs/run")   # metrics, dataset table, soft prompt + dataset artifacts
    tracker.finish()
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from soft_prompting.config import WandbConfig


def wandb_mode(config: WandbConfig) -> str:
    """The W&B mode to use: the configured one, else online only when a key is available."""
    if config.mode:
        if config.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb.mode={config.mode!r}: use online, offline or disabled")
        return config.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    return "online" if has_key else "offline"


def build_loggers(
    wandb_config: WandbConfig,
    run_dir: Path,
    run_name: str,
    hparams: dict,
    resume_step: int | None = None,
) -> list[Logger]:
    """CSV logger into ``run_dir/logs``, plus a W&B logger when enabled.

    ``resume_step``: the step of the checkpoint a run resumes; the curve logged before it is kept.
    """
    loggers: list[Logger] = [
        ResumableCSVLogger(save_dir=str(run_dir), name="logs", version="", resume_step=resume_step)
    ]
    if wandb_config.enabled:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=wandb_config.project,
                entity=wandb_config.entity,
                name=run_name,
                save_dir=str(run_dir),
                mode=wandb_mode(wandb_config),
                config=hparams,
            )
        )
    return loggers


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSV logger, except that a resumed run appends to ``metrics.csv``.

    Lightning's own deletes the file when its folder is not empty, so resuming after a kill would
    lose the curve up to the kill. Here the rows before ``resume_step`` (the resumed checkpoint's
    step) are kept and the rows after it, which the resumed run logs again, are dropped.
    """

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._resume_step)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._resume_step is None:  # a fresh run (overwrite=true): a fresh curve
            path.unlink()
            return
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            keys, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if _step(row) is not None and _step(row) < self._resume_step]
        self.metrics_keys = sorted(keys)
        self._write_rows(self.metrics_keys, kept)

    def log_hparams(self, params: dict) -> None:
        from lightning.pytorch.core.saving import save_hparams_to_yaml

        from soft_prompting.run_files import atomic_path

        self.hparams.update(params)
        with atomic_path(Path(self.log_dir) / self.NAME_HPARAMS_FILE) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        self._write_rows(fieldnames, rows)

    def _write_rows(self, fieldnames: list[str], rows: list[dict]) -> None:
        from soft_prompting.run_files import atomic_path

        with atomic_path(self.metrics_file_path) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def _step(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None  # a torn last row of a killed run


def finish_tracking() -> None:
    """End the active W&B run, so the next job of a sweep starts its own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


class ExperimentTracker:
    """A W&B run for one experiment: config, metrics, the divergent dataset and artifacts.

    Args:
        config: what the run logs as its config: a dataclass, dict, DictConfig or a YAML path.
        use_wandb: False turns every method into a no-op (W&B is not even imported).
        project_name: W&B project.
        mode: ``online``, ``offline`` or ``disabled``; None picks ``WANDB_MODE``, else online when
            an API key is configured and offline otherwise.
        run_dir: where W&B keeps its files (offline runs wait there for ``wandb sync``).
        name: run name.
        entity: W&B entity (team or user).

    When a W&B run is already active (say, the one Lightning's ``WandbLogger`` opened during
    training), the tracker joins it instead of opening a second one.
    """

    def __init__(
        self,
        config=None,
        use_wandb: bool = True,
        project_name: str = "soft-prompting",
        mode: str | None = None,
        run_dir: str | Path | None = None,
        name: str | None = None,
        entity: str | None = None,
    ) -> None:
        self.config = plain_config(config)
        self.mode = wandb_mode(WandbConfig(mode=mode)) if use_wandb else "disabled"
        self.run = None
        self._owns_run = False
        if self.mode == "disabled":
            return
        import wandb

        if wandb.run is not None:
            self.run = wandb.run
            self.run.config.update(self.config, allow_val_change=True)
            return
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project_name,
            entity=entity,
            name=name or self.config.get("name"),
            dir=str(run_dir) if run_dir is not None else None,
            mode=self.mode,
            config=self.config,
        )
        self._owns_run = True

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def lightning_logger(self) -> Logger | None:
        """A Lightning ``WandbLogger`` writing into this very run (None when disabled)."""
        if not self.enabled:
            return None
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self.run)

    def log_config(self, config) -> None:
        """Add (or update) config values of the run."""
        if self.enabled:
            self.run.config.update(plain_config(config), allow_val_change=True)

    def log_metrics(self, metrics: Mapping, step: int | None = None) -> None:
        """Log the numbers of ``metrics`` (nested dicts become ``a/b`` keys; others are skipped)."""
        flat = {k: v for k, v in _flatten(metrics).items() if _is_number(v)}
        if self.enabled and flat:
            self.run.log(flat, step=step)

    def log_dataset(self, records: list[dict], name: str = "divergent_dataset") -> None:
        """The divergent dataset as a W&B table: one row per record, the metrics as columns."""
        if not self.enabled:
            return
        import wandb

        columns = [
            "prompt",
            "generation_1",
            "generation_2",
            "category",
            "source",
            "kl_divergence",
            "token_disagreement_rate",
            "vocab_jaccard_similarity",
            "reliability",
            "first_disagreement",
        ]
        rows = []
        for record in records:
            metrics = record.get("metrics", {})
            rows.append(
                [str(record.get(key, "")) for key in columns[:5]]
                + [metrics.get(key) for key in columns[5:9]]
                + [(metrics.get("disagreement_positions") or {}).get("first")]
            )
        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def log_artifact(self, path: str | Path, name: str, type: str) -> None:
        """Upload a file or folder as a versioned W&B artifact."""
        if not self.enabled:
            return
        import wandb

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log artifact {name!r}: {path} does not exist")
        artifact = wandb.Artifact(_artifact_name(name), type=type)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def log_soft_prompt(self, directory: str | Path, name: str = "soft_prompt") -> None:
        """The PEFT soft-prompt adapter folder as a ``model`` artifact."""
        self.log_artifact(directory, name, type="model")

    def log_run_dir(self, run_dir: str | Path) -> list[str]:
        """Log what a finished run directory holds; returns the names of what was logged.

        Reads ``metrics.json``, ``divergent_dataset.jsonl`` (table + ``dataset`` artifact),
        ``soft_prompt/`` (``model`` artifact) and ``report/report.html`` (``report`` artifact),
        each only if present.
        """
        from soft_prompting.run_files import read_jsonl

        run_dir, logged = Path(run_dir), []
        if not self.enabled:
            return logged
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            self.log_metrics(json.loads(metrics_file.read_text()))
            logged.append("metrics")
        dataset = run_dir / "divergent_dataset.jsonl"
        if dataset.is_file():
            self.log_dataset(read_jsonl(dataset))
            self.log_artifact(dataset, "divergent_dataset", type="dataset")
            logged += ["dataset_table", "dataset_artifact"]
        if (run_dir / "soft_prompt").is_dir():
            self.log_soft_prompt(run_dir / "soft_prompt")
            logged.append("soft_prompt")
        report = run_dir / "report" / "report.html"
        if report.is_file():
            self.log_artifact(report, "report", type="report")
            logged.append("report")
        return logged

    def finish(self) -> None:
        """Close the run if this tracker opened it (a joined run belongs to whoever opened it)."""
        if self.run is not None and self._owns_run:
            self.run.finish()
        self.run = None

    def __enter__(self) -> ExperimentTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def plain_config(config) -> dict:
    """A plain dict of a dataclass, mapping, DictConfig or YAML file (None: empty)."""
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(
        f"config must be a dataclass, dict, DictConfig or YAML path, not {type(config)}"
    )


def _flatten(values: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{name}/")
        else:
            flat[name] = value
    return flat


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _artifact_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:128]
