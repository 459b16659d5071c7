"""A report people want to read, from a finished run directory: self-contained HTML + Markdown.

    python -m soft_prompting.report run_dir=outputs/toy_sandbagging/2026-01-01_12-00-00
    python -m soft_prompting.report run_dir=outputs/compare/toy_double/... models=false

Arguments are ``key=value`` like ``train``'s overrides (``clustering.method=kmeans`` reaches the
clustering settings); an unknown key fails, naming it. Written into ``RUN_DIR/report/``:
``report.html`` (every image embedded, no network needed or used), ``report.md`` with its PNGs,
``analysis/`` (:class:`~soft_prompting.analysis.patterns.DivergenceAnalyzer`) and ``clusters/``
(:class:`~soft_prompting.analysis.clustering.BehavioralClusteringAnalyzer`).

The recipe (:func:`build_report`): read the run → analyse and cluster its records → plot → one
function per section turns all that into plain data (``sections.py``) → the Jinja2 templates
render it (``render.py``, ``templates/``, ``style.css``). The page opens with a written summary of
what model_2 does differently, built from the two continuations of the records.

What the run directory may hold, and what the report reads from it (each part is optional except
the dataset): ``.hydra/config.yaml`` (config and model ids), ``metrics.json`` (validation
divergence with and without the soft prompt), ``logs/metrics.csv`` (training curve),
``divergent_dataset.jsonl`` (or ``.pt``), the evaluation of ``soft_prompting.evaluate``
(``evaluation/summary.json`` and ``evaluated_prompts.jsonl``; one per category in a comparison; or
one written elsewhere, see ``evaluation_dir``), and ``comparison.json`` with one sub-run per
category (a ``soft_prompting.compare`` directory).

With ``models=true`` (the default) the pair is loaded from the run's config for the teacher-forced
position profile, the argmax token pairs and the hidden-state similarity of the generations;
``models=false`` skips that (for pairs too large to load twice). The clusters are built from the
disagreeing spans of the two continuations either way (``clustering.features``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from soft_prompting import run_files
from soft_prompting.analysis.clustering import (
    BehavioralClusteringAnalyzer,
    ClusteringConfig,
    word_diff,
)
from soft_prompting.analysis.patterns import (
    DivergenceAnalyzer,
    find_evaluation_summary,
    load_records,
    read_training_log,
)
from soft_prompting.errors import ConfigError, DataError, SoftPromptingError, reported_errors

__all__ = ["ReportConfig", "build_report", "main", "parse_args", "read_run", "word_diff"]

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    """Arguments of ``python -m soft_prompting.report``."""

    run_dir: str = MISSING
    """A finished train (or compare) run directory."""
    output_dir: str | None = None
    """Where the report goes; null: RUN_DIR/report."""
    models: bool = True
    """Load the pair: teacher-forced positions, argmax token pairs and hidden-state embeddings."""
    semantic: str = "auto"
    """Semantic similarity of the generations: auto, hidden_states, minilm or none."""
    device: str = "auto"
    """Where the pair runs: auto (the best device here, as ``training.accelerator=auto``), cpu, cuda."""
    top_k: int = 8
    """Hard prompts shown side by side."""
    max_records: int = 5000
    """Records analysed (the highest-KL ones); the rest are counted, not analysed."""
    title: str | None = None
    """Report title; null: the run's name."""
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    """Clustering settings (clustering.method=kmeans, clustering.reducer=pca, ...)."""
    min_baseline: float = 0.01
    """A lift over a baseline divergence below this (nats/token) is shown as n/a, not a ratio."""
    evaluation_dir: str | None = None
    """An evaluation written outside the run (the seed-style script's --output-dir); null: the
    run's own, else one found beside the run whose prompts_file lies in it."""


# ---------------------------------------------------------------------------- reading the run
@dataclass
class RunContents:
    """What a run directory holds (every part but the records may be empty)."""

    run_dir: Path
    records: list[dict]
    config: dict
    metrics: dict
    training_logs: dict[str, list[dict]]
    """Lightning's CSV log rows: of the run, or of each category's run in a comparison."""
    evaluation: tuple[Path, dict] | None
    """The run's own evaluation summary (``(path, content)``), if any."""
    comparison: dict | None
    evaluations: dict[str, tuple[Path, dict, list[dict]]] = field(default_factory=dict)
    """Every evaluation of the run, by category ("" for a train run): summary path, summary,
    evaluated records."""


def read_run(run_dir: str | Path, evaluation_dir: str | Path | None = None) -> RunContents:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run_dir={str(run_dir)!r} is not a folder")
    comparison_file = run_dir / run_files.COMPARISON
    comparison = run_files.read_json(comparison_file) if comparison_file.is_file() else None
    try:
        records = run_files.check_scored(load_records(run_dir), run_dir)
    except FileNotFoundError as err:
        raise DataError(
            f"{run_dir} holds no divergent_dataset.jsonl: point run_dir at a finished train or "
            "compare run"
        ) from err
    config: dict = {}
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        config = run_files.read_yaml(config_file)
    elif comparison is not None:
        config = {"name": comparison.get("name"), "model_pair": comparison.get("model_pair", {})}
    elif (run_dir / "soft_prompt" / "soft_prompting.json").is_file():
        hparams = run_files.read_json(run_dir / "soft_prompt" / "soft_prompting.json")
        config = {"model_pair": {k: hparams.get(k) for k in ("model_1_name", "model_2_name")}}
    metrics_file = run_dir / run_files.METRICS
    metrics = run_files.read_json(metrics_file) if metrics_file.is_file() else {}
    return RunContents(
        run_dir=run_dir,
        records=records,
        config=config,
        metrics=metrics,
        training_logs=training_logs(run_dir, comparison),
        evaluation=find_evaluation_summary(run_dir),
        comparison=comparison,
        evaluations=read_evaluations(run_dir, comparison, evaluation_dir),
    )


def read_evaluations(
    run_dir: Path, comparison: dict | None, evaluation_dir: str | Path | None = None
) -> dict[str, tuple[Path, dict, list[dict]]]:
    """Each evaluation of the run: its summary and evaluated records, by category.

    A comparison has one per category folder; a train run its own (``evaluation/``), else the
    one in ``evaluation_dir``, else one written beside the run (a seed-style evaluation's
    ``--output-dir``) whose ``prompts_file`` lies inside ``run_dir``.
    """
    if comparison is not None:
        found = {
            name: _evaluation_at(find_evaluation_summary(_sub_run(run_dir, name, summary)))
            for name, summary in comparison.get("categories", {}).items()
        }
        return {name: value for name, value in found.items() if value is not None}
    if evaluation_dir is not None:
        folder = Path(evaluation_dir)
        if not (folder / run_files.SUMMARY).is_file():
            raise DataError(
                f"evaluation_dir={str(folder)!r} holds no {run_files.SUMMARY}: point it at the "
                "folder soft_prompting.evaluate wrote"
            )
        found = _evaluation_at((folder / run_files.SUMMARY, _read_json(folder / run_files.SUMMARY)))
    else:
        found = _evaluation_at(find_evaluation_summary(run_dir)) or _evaluation_beside(run_dir)
    return {"": found} if found else {}


def _evaluation_beside(run_dir: Path) -> tuple[Path, dict, list[dict]] | None:
    """An evaluation summary near the run (its parent's folders, two levels down, or the seed's
    default ``outputs/evaluation``) whose ``prompts_file`` is inside ``run_dir``."""
    run_dir = run_dir.resolve()
    places = [*run_dir.parent.glob(f"*/{run_files.SUMMARY}")]
    places += [*run_dir.parent.glob(f"*/*/{run_files.SUMMARY}")]
    places.append(Path("outputs") / "evaluation" / run_files.SUMMARY)
    for path in places:
        summary = _read_json(path) if path.is_file() else None
        prompts = (summary or {}).get("prompts_file")
        if not isinstance(prompts, str):
            continue
        prompts_path = Path(prompts)
        if not prompts_path.is_absolute():
            prompts_path = (path.parent / prompts_path).resolve()
        if prompts_path.resolve().is_relative_to(run_dir):
            return _evaluation_at((path, summary))
    return None


def _evaluation_at(found: tuple[Path, dict] | None) -> tuple[Path, dict, list[dict]] | None:
    if found is None:
        return None
    path, summary = found
    records_file = path.parent / run_files.EVALUATED_PROMPTS
    records = run_files.read_jsonl(records_file) if records_file.is_file() else []
    return path, summary, records


def _read_json(path: Path) -> dict | None:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return content if isinstance(content, dict) else None


def _sub_run(run_dir: Path, name: str, summary: dict) -> Path:
    # Sub-runs sit in the comparison folder, wherever it was moved since.
    return run_dir / name if (run_dir / name).is_dir() else Path(summary["run_dir"])


def training_logs(run_dir: Path, comparison: dict | None) -> dict[str, list[dict]]:
    if comparison is None:
        return {run_dir.name: read_training_log(run_dir)}
    logs = {}
    for name, summary in comparison.get("categories", {}).items():
        logs[name] = read_training_log(_sub_run(run_dir, name, summary))
    return logs


def load_pair(config: dict, device: str):
    """The run's model pair, or None (with the reason logged) when it cannot be loaded."""
    from soft_prompting.pair.loading import ModelPairManager
    from soft_prompting.pair.placement import resolve_device

    pair_config = config.get("model_pair") or {}
    if not pair_config.get("model_1_name") or not pair_config.get("model_2_name"):
        return None, "the run's config names no model pair"
    try:
        manager = ModelPairManager(
            device=resolve_device(device, key="device"),
            torch_dtype=pair_config.get("torch_dtype") or "auto",
            load_in_8bit=bool(pair_config.get("load_in_8bit")),
            load_in_4bit=bool(pair_config.get("load_in_4bit")),
            trust_remote_code=bool(pair_config.get("trust_remote_code")),
            device_map=pair_config.get("device_map"),
        )
        pair = manager.load_model_pair(
            pair_config["model_1_name"],
            pair_config["model_2_name"],
            pair_config.get("revision_1"),
            pair_config.get("revision_2"),
        )
        return pair, None
    except Exception as err:  # the report is still worth having without the models
        return None, f"model pair not loaded ({type(err).__name__}: {str(err)[:200]})"


# ---------------------------------------------------------------------------- the recipe
def build_report(config: ReportConfig) -> dict[str, Path]:
    """Read the run → analyse → cluster → plot → sections → ``report.html`` and ``report.md``."""
    from soft_prompting.analysis import plots
    from soft_prompting.report.render import render_html, render_markdown
    from soft_prompting.report.sections import ReportInputs, build_sections

    started = time.perf_counter()
    missing = [m for m in ("matplotlib", "sklearn", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        raise SoftPromptingError(
            f"the report needs {', '.join(missing)}: pip install 'soft-prompting[analysis]'"
        )
    run = read_run(config.run_dir, config.evaluation_dir)
    out = Path(config.output_dir) if config.output_dir else run.run_dir / run_files.REPORT
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    records = sorted(run.records, key=lambda r: -r.get("metrics", {}).get("kl_divergence", 0.0))
    if len(records) > config.max_records:
        notes.append(f"analysed the {config.max_records} highest-KL of {len(records)} records")
        records = records[: config.max_records]
    pair = None
    if config.models:
        pair, why = load_pair(run.config, config.device)
        if why:
            notes.append(why)
    analysis = DivergenceAnalyzer(
        output_dir=out / "analysis", pair=pair, semantic=config.semantic
    ).analyze_divergence_patterns(records)
    clustering_settings = dataclasses.asdict(config.clustering)
    clusters = BehavioralClusteringAnalyzer(
        output_dir=out / "clusters", pair=pair, **clustering_settings
    ).analyze_divergent_behaviors(records)
    figures = dict(analysis["plots"])
    if clusters["files"].get("plot"):
        figures["clusters"] = clusters["files"]["plot"]
    if run.comparison is not None:
        figures["comparison"] = plots.comparison_plot(
            run.comparison["categories"], out / "comparison.png"
        )
    figures["training"] = plots.training_plot(run.training_logs, out / "training.png")
    figures["prompt_effect"] = plots.prompt_effect_plot(run.metrics, out / "prompt_effect.png")
    figures = {k: Path(v) for k, v in figures.items() if v is not None}
    notes += analysis["notes"] + clusters["notes"]
    sections = build_sections(
        ReportInputs(run, records, analysis, clusters, figures, notes, config)
    )
    html_path = run_files.write_text(out / "report.html", render_html(sections, figures))
    md_path = run_files.write_text(out / "report.md", render_markdown(sections, figures, out))
    print(f"report ({time.perf_counter() - started:.1f} s) -> {html_path} and {md_path}")
    return {"html": html_path, "markdown": md_path}


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str]) -> ReportConfig:
    """``key=value`` arguments (as ``train``'s overrides) into a validated :class:`ReportConfig`."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        sys.exit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments are key=value (e.g. run_dir=outputs/run), got {bad}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ReportConfig), OmegaConf.from_dotlist(argv))
        if OmegaConf.is_missing(merged, "run_dir"):
            raise ConfigError("run_dir is required: python -m soft_prompting.report run_dir=PATH")
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(str(err).splitlines()[0]) from err


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with reported_errors():
        build_report(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
