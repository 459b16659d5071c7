"""Compare a model pair across behaviour categories: one soft prompt and divergent dataset each.

    python -m soft_prompting.compare categories=[sandbagging,unlearning]
    python -m soft_prompting.compare categories=[animals,persona] data.text_dir=my_texts \\
        model_pair.model_1_name=/models/a model_pair.model_2_name=/models/b hydra.run.dir=out/cmp

For each category, in one process and one after another: train (``soft_prompting.train``, with
``data.categories=[CATEGORY]``) → divergent dataset → ``soft_prompting.evaluate`` when that module
is installed (skipped with a note otherwise) → the frozen models are freed before the next one.
Each category's run directory (``RUN_DIR/CATEGORY``) is a complete train run directory; a category
whose run already finished is reused, so a comparison that was stopped picks up where it was.

Then, in the run directory: ``comparison.json`` and ``comparison.md`` (and ``comparison.png``) with,
per category, the divergence of its hard prompts (mean, spread, bootstrap confidence interval), lift
over baselines, reliability and its top examples. ``runs=[DIR,...]`` aggregates finished train runs
(a Hydra multirun's jobs, say) without training anything.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import subprocess
import sys
import time
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from soft_prompting import run_files
from soft_prompting.analysis.patterns import (
    evaluation_headline,
    find_evaluation_summary,
    load_records,
)
from soft_prompting.config import CompareConfig, TrainConfig, register_configs, to_train_config
from soft_prompting.errors import (
    ConfigError,
    DataError,
    Interrupted,
    SoftPromptingError,
    exit_2_on_config_errors,
    reported_errors,
)
from soft_prompting.report.comparison import comparison_markdown
from soft_prompting.run_files import write_json

log = logging.getLogger(__name__)
register_configs()

EVALUATE_MODULE = "soft_prompting.evaluate"
"""The evaluation stage, run as ``python -m EVALUATE_MODULE`` through its command-line contract."""
CI_METRICS = ("kl_divergence", "token_disagreement_rate", "reliability", "vocab_jaccard_similarity")


def compare(config: CompareConfig, run_dir: Path) -> dict:
    """The recipe: per category train → dataset → evaluate, freeing models; then aggregate."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.runs:
        jobs = [{"category": None, "run_dir": str(Path(d)), "status": "given"} for d in config.runs]
    else:
        jobs = []
        categories = resolve_categories(config)
        for number, category in enumerate(categories, 1):
            print(f"[compare] category {number}/{len(categories)}: {category}")
            jobs.append(run_category(config, category, run_dir / category))
    comparison = aggregate(jobs, config)
    write_json(run_dir / run_files.COMPARISON, comparison)
    try:
        from soft_prompting.analysis import plots

        plot = plots.comparison_plot(comparison["categories"], run_dir / "comparison.png")
    except ImportError:
        log.warning("no comparison.png: matplotlib is missing (the analysis extra)")
        plot = None
    run_files.write_text(run_dir / run_files.COMPARISON_MD, comparison_markdown(comparison, plot))
    if config.wandb.enabled:
        log_comparison(comparison, config, run_dir)
    print(f"comparison of {len(jobs)} categories -> {run_dir / run_files.COMPARISON_MD}")
    failed = [job["category"] for job in jobs if job["status"] == "failed"]
    if failed:
        raise SoftPromptingError(
            f"categories {failed} failed (errors in comparison.json); the others are kept"
        )
    return comparison


def resolve_categories(config: CompareConfig) -> list[str]:
    """``categories``, else ``data.categories``, else every category of the data source."""
    if config.categories:
        return list(config.categories)
    if config.data.categories:
        return list(config.data.categories)
    if config.data.text_dir:
        from soft_prompting.data.datamodule import load_text_dir

        return list(load_text_dir(config.data.text_dir, None))
    if config.data.hf_dataset:
        raise ConfigError("with data.hf_dataset, name the categories: categories=[a,b]")
    from soft_prompting.organisms.corpus import BUILTIN_CATEGORIES

    return list(BUILTIN_CATEGORIES)


def category_config(config: CompareConfig, category: str, job_dir: Path) -> TrainConfig:
    """The train config of one category: the comparison's settings, its texts only."""
    finished_checkpoint = job_dir / run_files.LAST_CHECKPOINT
    resume = finished_checkpoint.is_file() and not config.overwrite
    return TrainConfig(
        model_pair=config.model_pair,
        training=config.training,
        generation=config.generation,
        data=dataclasses.replace(config.data, categories=[category]),
        wandb=config.wandb,
        name=f"{config.name}-{category}",
        seed=config.seed,
        ckpt_path=str(finished_checkpoint) if resume else None,
        overwrite=config.overwrite,
        write_dataset=True,
    )


def run_category(config: CompareConfig, category: str, job_dir: Path) -> dict:
    """Train → dataset → evaluate for one category in ``job_dir``; never raises."""
    from soft_prompting.tracking import finish_tracking
    from soft_prompting.train import train

    job = {"category": category, "run_dir": str(job_dir), "notes": []}
    started = time.perf_counter()
    finished = (job_dir / run_files.METRICS).is_file() and (
        job_dir / run_files.DATASET_JSONL
    ).is_file()
    if finished and not config.overwrite:
        job["status"] = "reused"
        job["notes"].append("finished run found: reused (overwrite=true retrains)")
    else:
        train_config = category_config(config, category, job_dir)
        # The run directory documents itself like one of `train`'s.
        (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(train_config), job_dir / ".hydra" / "config.yaml")
        try:
            train(train_config, job_dir)
            job["status"] = "trained"
        except Interrupted:  # a signal stops the comparison, not just this category
            raise
        except Exception as err:  # one failed category must not lose the others
            log.exception("category %r failed", category)
            job |= {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        finally:
            finish_tracking()  # W&B runs never bleed into the next category
    job["train_seconds"] = round(time.perf_counter() - started, 1)
    # Freed before the evaluation process loads the pair again, and before the next category.
    job["models_alive_after_cleanup"] = free_models()
    if job["status"] != "failed":
        job["evaluation"] = run_evaluation(config, category, job_dir)
    return job


def run_evaluation(config: CompareConfig, category: str, job_dir: Path) -> dict:
    """``python -m soft_prompting.evaluate`` on the category's dataset, if that module exists.

    It runs as its own process (its models are freed when it exits) through its command-line
    contract: ``prompts_file=...``, the model pair, the data source, the accelerator and
    ``hydra.run.dir``.
    """
    if not config.evaluate:
        return {"status": "skipped", "note": "evaluate=false"}
    if find_evaluation_summary(job_dir) is not None and not config.overwrite:
        return {"status": "reused", "note": "an evaluation summary is already there"}
    if importlib.util.find_spec(EVALUATE_MODULE) is None:
        return {
            "status": "skipped",
            "note": f"{EVALUATE_MODULE} is not available: lift and reliability come from "
            "the divergent dataset only",
        }
    from soft_prompting.config import to_overrides

    data = dataclasses.asdict(config.data) | {"categories": [category]}
    command = [
        sys.executable,
        "-m",
        EVALUATE_MODULE,
        f"prompts_file={job_dir / run_files.DATASET_JSONL}",
        *to_overrides({"model_pair": dataclasses.asdict(config.model_pair)}),
        *to_overrides({"data": {k: v for k, v in data.items() if v is not None}}),
        # The same sampling, strategies and budget as the dataset: the baselines are matched to it.
        *to_overrides({"generation": dataclasses.asdict(config.generation)}),
        f"seed={config.seed}",
        f"training.accelerator={config.training.accelerator}",  # the same device as training
        # As many untrained prompts as the run trained: the untrained_pipeline baseline is matched.
        f"training.num_prompts={config.training.num_prompts}",
        f"training.num_soft_prompt_tokens={config.training.num_soft_prompt_tokens}",
        f"hydra.run.dir={job_dir / run_files.EVALUATION}",
    ]
    print(f"[compare] category {category!r}: evaluating")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = round(time.perf_counter() - started, 1)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        return {"status": "failed", "seconds": seconds, "note": " | ".join(tail)}
    return {"status": "done", "seconds": seconds}


def log_comparison(comparison: dict, config: CompareConfig, run_dir: Path) -> None:
    """One W&B run for the comparison: per-category numbers and the comparison files."""
    from soft_prompting.tracking import ExperimentTracker

    numbers = {
        name: {
            "kl_mean": c["kl_divergence"].get("mean"),
            "soft_prompt_lift": c["training"].get("soft_prompt_lift"),
            "top_k_lift": c.get("top_k_lift"),
            "reliability": c["reliability"].get("mean"),
        }
        for name, c in comparison["categories"].items()
    }
    with ExperimentTracker(
        config=dataclasses.asdict(config),
        project_name=config.wandb.project,
        mode=config.wandb.mode,
        run_dir=run_dir,
        name=config.name,
        entity=config.wandb.entity,
    ) as tracker:
        tracker.log_metrics(numbers)
        tracker.log_artifact(
            run_dir / run_files.COMPARISON, f"{config.name}-comparison", "comparison"
        )


def free_models() -> int:
    """Drop every cached model pair and collect; returns how many models are still alive."""
    from soft_prompting.pair.loading import ModelPairManager

    alive = ModelPairManager.clear_cache()
    if alive:
        log.warning("%d model(s) still referenced after the job: memory is not freed", alive)
    return alive


# ---------------------------------------------------------------------------- aggregation
def bootstrap_ci(
    values: np.ndarray, confidence: float = 0.95, samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (a point interval for fewer than 2 values)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    if values.size == 1:
        return (float(values[0]), float(values[0]))
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(samples, values.size), replace=True).mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def metric_stats(records: list[dict], metric: str, config: CompareConfig) -> dict:
    values = np.asarray(
        [float(r.get("metrics", {}).get(metric, np.nan)) for r in records], dtype=np.float64
    )
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"n": 0}
    low, high = bootstrap_ci(values, config.confidence, config.bootstrap_samples, config.seed)
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "median": float(np.median(values)),
        "ci_low": low,
        "ci_high": high,
    }


def top_k_lift(kls: list[float], top_k: int) -> float | None:
    """Mean KL of the ``top_k`` records over that of the *other* records (None if there are none
    or their mean is 0); dividing by all records, the top-k included, is >= 1 by construction."""
    ranked = sorted(kls, reverse=True)
    top, rest = ranked[:top_k], ranked[top_k:]
    if not top or not rest or not np.mean(rest) > 0:
        return None
    return float(np.mean(top) / np.mean(rest))


def summarise_category(job: dict, config: CompareConfig) -> dict:
    """The numbers of one category's run directory."""
    import json

    run_dir = Path(job["run_dir"])
    try:
        records = load_records(run_dir)
    except FileNotFoundError as err:
        raise DataError(f"{run_dir}: no divergent dataset to compare ({err})") from err
    summary: dict = {"run_dir": str(run_dir), "status": job["status"], "num_records": len(records)}
    for metric in CI_METRICS:
        summary[metric] = metric_stats(records, metric, config)
    metrics_file = run_dir / run_files.METRICS
    training = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    with_prompt, without = training.get("val/divergence"), training.get("val/divergence_no_prompt")
    summary["training"] = {
        "val/divergence": with_prompt,
        "val/divergence_no_prompt": without,
        "soft_prompt_lift": with_prompt / without if with_prompt and without else None,
    }
    summary["top_k_lift"] = top_k_lift(
        [r["metrics"]["kl_divergence"] for r in records], config.top_k
    )
    found = find_evaluation_summary(run_dir)
    summary["evaluation"] = (
        {"file": str(found[0]), **evaluation_headline(found[1])} if found else None
    )
    summary["top_examples"] = [
        {
            "prompt": r.get("prompt"),
            "generation_1": r.get("generation_1"),
            "generation_2": r.get("generation_2"),
            "source": r.get("source"),
            "kl_divergence": r["metrics"].get("kl_divergence"),
            "token_disagreement_rate": r["metrics"].get("token_disagreement_rate"),
            "reliability": r["metrics"].get("reliability"),
        }
        for r in sorted(records, key=lambda r: -r["metrics"]["kl_divergence"])[: config.top_k]
    ]
    return summary


def aggregate(jobs: list[dict], config: CompareConfig) -> dict:
    """``comparison.json``'s content: the pair, each job, and each category's summary."""
    categories = {}
    for job in jobs:
        if job["status"] == "failed":
            continue
        summary = summarise_category(job, config)
        if job["category"] is None:  # a given run: named by its records' category
            names = {r.get("category") for r in load_records(job["run_dir"])}
            job["category"] = names.pop() if len(names) == 1 else Path(job["run_dir"]).name
        categories[job["category"]] = summary
    ranking = sorted(categories, key=lambda c: -(categories[c]["kl_divergence"].get("mean") or 0))
    return {
        "name": config.name,
        "model_pair": dataclasses.asdict(config.model_pair),
        "seed": config.seed,
        "confidence": config.confidence,
        "top_k": config.top_k,
        "definitions": {
            "kl_divergence": "per record: mean per-token KL(p1 || p2) on model_1's continuation "
            "of the prompt, without soft prompt; ci_low/ci_high: percentile bootstrap of the mean",
            "soft_prompt_lift": "validation divergence with the trained soft prompt / without it",
            "top_k_lift": "mean KL of the top_k records / mean KL of the other records",
            "reliability": "share of sampled continuation pairs whose two generations differ",
            "evaluation": "headline numbers of soft_prompting.evaluate's summary, when it ran",
        },
        "ranking": ranking,
        "categories": categories,
        "jobs": jobs,
    }


def lightning_logs_once() -> None:
    """Lightning's log lines printed once, through Hydra's handlers (console and compare.log).

    Lightning is first imported here after Hydra has set up logging, so its loggers propagate to
    Hydra's root handlers, while the ``lightning`` package still adds a console handler of its
    own on import: every Lightning line was printed twice, once by each.
    """
    import lightning  # noqa: F401 - its handlers are added on import

    if not logging.getLogger().hasHandlers():
        return  # no Hydra logging (hydra/job_logging=disabled): Lightning's handlers print
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # its console handlers, not file handlers
                logger.removeHandler(handler)
        logger.propagate = True


@exit_2_on_config_errors
@hydra.main(version_base=None, config_path="pkg://soft_prompting.conf", config_name="compare")
def main(cfg: DictConfig) -> float:
    lightning_logs_once()
    with reported_errors():
        # to_train_config validates any root schema: here it builds a CompareConfig.
        config = to_train_config(cfg)
        comparison = compare(config, Path(HydraConfig.get().runtime.output_dir))
    means = [c["kl_divergence"].get("mean") or 0 for c in comparison["categories"].values()]
    return float(max(means, default=0.0))


if __name__ == "__main__":
    main()
