"""A report people want to read, from a finished run directory: self-contained HTML + Markdown.

    python -m soft_prompting.report run_dir=outputs/toy_sandbagging/2026-01-01_12-00-00
    python -m soft_prompting.report run_dir=outputs/compare/toy_double/... models=false

Arguments are ``key=value`` like ``train``'s overrides (``clustering.method=kmeans`` reaches the
clustering settings); an unknown key fails, naming it. Written into ``RUN_DIR/report/``:
``report.html`` (every image embedded, no network needed or used), ``report.md`` with its PNGs,
``analysis/`` (:class:`~soft_prompting.analysis.patterns.DivergenceAnalyzer`) and ``clusters/``
(:class:`~soft_prompting.analysis.clustering.BehavioralClusteringAnalyzer`).

What the run directory may hold, and what the report reads from it (each part is optional except
the dataset): ``.hydra/config.yaml`` (config and model ids), ``metrics.json`` (validation
divergence with and without the soft prompt), ``logs/metrics.csv`` (training curve),
``divergent_dataset.jsonl`` (or ``.pt``), the summary of ``soft_prompting.evaluate``
(``evaluation/summary.json`` or another ``*summary*.json``: its lift and reliability numbers), and
``comparison.json`` with one sub-run per category (a ``soft_prompting.compare`` directory).

With ``models=true`` (the default) the pair is loaded from the run's config for the teacher-forced
position profile, the argmax token pairs and hidden-state embeddings; ``models=false`` skips that
(for pairs too large to load twice) and uses word TF-IDF for the clusters.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import html
import importlib.util
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from soft_prompting.analysis.clustering import BehavioralClusteringAnalyzer, ClusteringConfig
from soft_prompting.analysis.patterns import (
    DivergenceAnalyzer,
    evaluation_headline,
    find_evaluation_summary,
    load_records,
    read_training_log,
)
from soft_prompting.errors import ConfigError, DataError, SoftPromptingError, reported_errors

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
    """Where the pair runs: auto (cuda if available), cpu, cuda."""
    top_k: int = 8
    """Hard prompts shown side by side."""
    max_records: int = 5000
    """Records analysed (the highest-KL ones); the rest are counted, not analysed."""
    title: str | None = None
    """Report title; null: the run's name."""
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    """Clustering settings (clustering.method=kmeans, clustering.reducer=pca, ...)."""


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
    comparison: dict | None


def read_run(run_dir: str | Path) -> RunContents:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run_dir={str(run_dir)!r} is not a folder")
    comparison_file = run_dir / "comparison.json"
    comparison = json.loads(comparison_file.read_text()) if comparison_file.is_file() else None
    try:
        records = load_records(run_dir)
    except FileNotFoundError as err:
        raise DataError(
            f"{run_dir} holds no divergent_dataset.jsonl: point run_dir at a finished train or "
            "compare run"
        ) from err
    config: dict = {}
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    elif comparison is not None:
        config = {"name": comparison.get("name"), "model_pair": comparison.get("model_pair", {})}
    elif (run_dir / "soft_prompt" / "soft_prompting.json").is_file():
        hparams = json.loads((run_dir / "soft_prompt" / "soft_prompting.json").read_text())
        config = {"model_pair": {k: hparams.get(k) for k in ("model_1_name", "model_2_name")}}
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return RunContents(
        run_dir=run_dir,
        records=records,
        config=config,
        metrics=metrics,
        training_logs=training_logs(run_dir, comparison),
        evaluation=find_evaluation_summary(run_dir),
        comparison=comparison,
    )


def training_logs(run_dir: Path, comparison: dict | None) -> dict[str, list[dict]]:
    if comparison is None:
        return {run_dir.name: read_training_log(run_dir)}
    logs = {}
    for name, summary in comparison.get("categories", {}).items():
        # Sub-runs sit in the comparison folder, wherever it was moved since.
        sub_run = run_dir / name if (run_dir / name).is_dir() else Path(summary["run_dir"])
        logs[name] = read_training_log(sub_run)
    return logs


def load_pair(config: dict, device: str):
    """The run's model pair, or None (with the reason logged) when it cannot be loaded."""
    import torch

    from soft_prompting.pair.loading import ModelPairManager

    pair_config = config.get("model_pair") or {}
    if not pair_config.get("model_1_name") or not pair_config.get("model_2_name"):
        return None, "the run's config names no model pair"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        manager = ModelPairManager(
            device=device,
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
    """Read the run → analyse → cluster → plot → write ``report.html`` and ``report.md``."""
    from soft_prompting.analysis import plots

    started = time.perf_counter()
    missing = [m for m in ("matplotlib", "sklearn", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        raise SoftPromptingError(
            f"the report needs {', '.join(missing)}: pip install 'soft-prompting[analysis]'"
        )
    run = read_run(config.run_dir)
    out = Path(config.output_dir) if config.output_dir else run.run_dir / "report"
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
    page = ReportPage(run, records, analysis, clusters, figures, notes, config, out)
    html_path = out / "report.html"
    html_path.write_text(page.html(), encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(page.markdown(), encoding="utf-8")
    print(f"report ({time.perf_counter() - started:.1f} s) -> {html_path} and {md_path}")
    return {"html": html_path, "markdown": md_path}


# ---------------------------------------------------------------------------- rendering
def word_diff(text_1: str, text_2: str) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """Each generation as ``(word, differs)`` pairs, from a word-level diff of the two."""
    words_1, words_2 = str(text_1 or "").split(), str(text_2 or "").split()
    marked_1, marked_2 = [], []
    matcher = difflib.SequenceMatcher(a=words_1, b=words_2, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        marked_1 += [(w, op != "equal") for w in words_1[i1:i2]]
        marked_2 += [(w, op != "equal") for w in words_2[j1:j2]]
    return marked_1, marked_2


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _markdown_marked(marked: list[tuple[str, bool]]) -> str:
    """Words with each run of differing ones in bold, Markdown-escaped."""
    pieces, run = [], []
    for word, differs in [*marked, ("", False)]:
        word = re.sub(r"([\\`*_|\[\]<>])", r"\\\1", word)
        if differs:
            run.append(word)
            continue
        if run:
            pieces.append(f"**{' '.join(run)}**")
            run = []
        if word:
            pieces.append(word)
    return " ".join(pieces)


def _short(text, limit: int = 150) -> str:
    """One line of at most ``limit`` characters (for lists; the examples show texts in full)."""
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(headers: list[str], rows: list[list], numeric: int = 1, css: list[str] = ()) -> str:
    """An HTML table of escaped cells; columns from ``numeric`` on are right-aligned numbers.

    ``css`` names a class per column (e.g. the model colours); "" for none.
    """

    def cells(tag: str, values: list) -> str:
        out = []
        for i, value in enumerate(values):
            classes = " ".join(
                c for c in ("num" if i >= numeric else "", css[i] if i < len(css) else "") if c
            )
            attribute = f' class="{classes}"' if classes else ""
            out.append(f"<{tag}{attribute}>{_e(value)}</{tag}>")
        return "".join(out)

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table><tr>{cells('th', headers)}</tr>{body}</table>"


CSS = """
:root { --m1: #3366cc; --m2: #dc6b2f; --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb;
        --bg: #f5f7fa; --m1bg: #dbe6fb; --m2bg: #fbe3d6; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 24px 48px; }
header.top { background: #1f2933; color: #fff; padding: 26px 0 22px; }
header.top div { max-width: 1080px; margin: 0 auto; padding: 0 24px; }
header.top h1 { margin: 0 0 6px; font-size: 24px; }
header.top p { margin: 2px 0; color: #cbd2d9; }
.pairline code { color: #fff; background: rgba(255,255,255,0.12); padding: 1px 6px;
                 border-radius: 4px; }
.m1 { color: var(--m1); font-weight: 600; }
.m2 { color: var(--m2); font-weight: 600; }
header.top .m1 { color: #9dbbf5; } header.top .m2 { color: #f5b48f; }
h2 { margin: 34px 0 10px; font-size: 19px; border-bottom: 2px solid var(--line);
     padding-bottom: 4px; }
h3 { margin: 18px 0 6px; font-size: 15px; }
p.lead { color: var(--muted); margin: 4px 0 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
               letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 700; margin-top: 2px; }
.card .sub { color: var(--muted); font-size: 12px; }
figure { margin: 10px 0 4px; background: #fff; border: 1px solid var(--line); border-radius: 8px;
         padding: 10px; text-align: center; }
figure img { max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.row { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line);
        border-radius: 8px; overflow: hidden; font-size: 13px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.example { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px;
           margin: 12px 0; }
.example .prompt { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
                   background: #f0f2f5; border-radius: 6px; padding: 6px 9px; margin: 6px 0 8px; }
.gens { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
.gen { border-radius: 6px; padding: 7px 10px; font-family: ui-monospace, SFMono-Regular, Menlo,
       Consolas, monospace; font-size: 13px; min-height: 34px; }
.gen.one { border-left: 4px solid var(--m1); background: #f7f9fe; }
.gen.two { border-left: 4px solid var(--m2); background: #fffaf6; }
.gen .who { display: block; font-family: -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
            font-size: 11px; text-transform: uppercase; letter-spacing: .05em; margin-bottom: 2px; }
.gen.one .who { color: var(--m1); } .gen.two .who { color: var(--m2); }
mark.d1 { background: var(--m1bg); color: inherit; border-radius: 3px; padding: 0 2px; }
mark.d2 { background: var(--m2bg); color: inherit; border-radius: 3px; padding: 0 2px; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; }
.chip { background: #eef1f5; border-radius: 999px; padding: 1px 9px; font-size: 12px;
        color: #3e4c59; }
.g1 { color: var(--m1); } .g2 { color: var(--m2); }
.chip.hot { background: #1f2933; color: #fff; }
.note { background: #fff8e1; border: 1px solid #f5e3a3; border-radius: 6px; padding: 6px 10px;
        margin: 6px 0; font-size: 13px; }
.cluster { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
           margin: 10px 0; }
.cluster h3 { margin-top: 2px; }
.cluster .swatch { display: inline-block; width: 11px; height: 11px; border-radius: 3px;
                   margin-right: 6px; vertical-align: -1px; }
ul.ex { margin: 6px 0 0; padding-left: 18px; }
ul.ex li { margin: 4px 0; }
details { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
details pre { font-size: 12px; overflow-x: auto; }
footer { color: var(--muted); font-size: 12px; margin-top: 36px; }
"""


class ReportPage:
    """Renders one report as HTML and as Markdown from the same pieces."""

    def __init__(self, run, records, analysis, clusters, figures, notes, config, out_dir):
        self.run, self.records, self.analysis, self.clusters = run, records, analysis, clusters
        self.figures, self.notes, self.config, self.out_dir = figures, notes, config, out_dir
        pair = run.config.get("model_pair") or {}
        self.model_1 = pair.get("model_1_name") or "model_1"
        self.model_2 = pair.get("model_2_name") or "model_2"
        self.description = pair.get("description") or ""
        self.title = config.title or run.config.get("name") or run.run_dir.name
        self.headline = evaluation_headline(run.evaluation[1]) if run.evaluation else {}

    # ------------------------------------------------------------------ numbers shown
    def glance(self) -> list[tuple[str, str, str]]:
        """``(label, value, sub-line)`` of the cards at the top."""
        m, kl = self.run.metrics, self.analysis["summary"].get("kl_divergence", {})
        cards = []
        with_prompt, without = m.get("val/divergence"), m.get("val/divergence_no_prompt")
        if with_prompt is not None and without is not None:
            cards.append(
                ("soft prompt", _fmt(with_prompt), f"val divergence; {_fmt(without)} without")
            )
            if without > 0:
                cards.append(
                    ("soft-prompt lift", f"{with_prompt / without:.2f}×", "with / without")
                )
        cards.append(("hard prompts", str(len(self.run.records)), "records in the dataset"))
        if kl.get("n"):
            cards.append(("mean KL", _fmt(kl["mean"]), f"max {_fmt(kl['max'])} (nats / token)"))
        reliability = self.analysis["summary"].get("reliability", {})
        if reliability.get("n"):
            cards.append(("reliability", _fmt(reliability["mean"], 2), "outputs differ (share)"))
        lift = next((v for k, v in self.headline.items() if "lift" in k.lower()), None)
        if lift is not None:
            name = next(k for k in self.headline if "lift" in k.lower())
            cards.append(("evaluation lift", f"{lift:.2f}×", name))
        cards.append(
            (
                "clusters",
                str(self.clusters["num_clusters"]),
                f"{self.clusters['method']} on {self.clusters['reducer']}",
            )
        )
        return cards

    def setup_rows(self) -> list[tuple[str, str]]:
        c = self.run.config
        t, g, d = c.get("training") or {}, c.get("generation") or {}, c.get("data") or {}
        rows = [
            ("model_1", self.model_1),
            ("model_2", self.model_2),
            ("difference", self.description),
            (
                "soft prompt",
                f"{t.get('num_soft_prompt_tokens', '–')} virtual tokens, "
                f"lr {t.get('learning_rate', '–')}, divergence {t.get('divergence', '–')}",
            ),
            (
                "training",
                f"{t.get('num_epochs', '–')} epochs, max_steps {t.get('max_steps', '–')}, "
                f"batch {t.get('batch_size', '–')}",
            ),
            (
                "generation",
                f"{g.get('num_prompts', '–')} prompts × "
                f"{g.get('num_generations_per_prompt', '–')} samples, "
                f"{g.get('max_length', '–')} new tokens, T={g.get('temperature', '–')}",
            ),
            ("texts", f"text_dir {d['text_dir']}" if d.get("text_dir") else "built-in categories"),
            (
                "categories",
                f"{c['categories']}, one soft prompt each"
                if c.get("categories")
                else str(d.get("categories") or "all"),
            ),
            ("seed", str(c.get("seed", "–"))),
        ]
        environment = self.run.metrics.get("environment") or {}
        if environment:
            rows.append(("environment", ", ".join(f"{k} {v}" for k, v in environment.items())))
        return [(k, v) for k, v in rows if v]

    def top_examples(self) -> list[dict]:
        """The highest-KL records; in a comparison, the best of each category in ranking order."""
        if self.run.comparison is None:
            return self.records[: self.config.top_k]
        ranking = self.run.comparison.get("ranking") or []
        each = max(2, -(-self.config.top_k // max(1, len(ranking))))
        return [
            record
            for category in ranking
            for record in [r for r in self.records if r.get("category") == category][:each]
        ]

    # ------------------------------------------------------------------ HTML
    def image(self, name: str, caption: str) -> str:
        path = self.figures.get(name)
        if path is None or not path.is_file():
            return ""
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return (
            f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}" />'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )

    def html(self) -> str:
        parts = [self._html_header(), "<main>", self._html_glance(), self._html_notes()]
        if self.run.comparison is not None:
            parts.append(self._html_comparison())
        parts += [
            self._html_training(),
            self._html_evaluation(),
            self._html_examples(),
            self._html_positions(),
            self._html_distributions(),
            self._html_semantic(),
            self._html_clusters(),
            self._html_setup(),
            f"<footer>soft_prompting report of <code>{_e(self.run.run_dir)}</code> — "
            f"{len(self.run.records)} records; every image is embedded in this file.</footer>",
            "</main>",
        ]
        body = "\n".join(p for p in parts if p)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8" />'
            '<meta name="viewport" content="width=device-width, initial-scale=1" />'
            f"<title>{_e(self.title)} — soft prompting report</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
        )

    def _html_header(self) -> str:
        return (
            '<header class="top"><div>'
            f"<h1>{_e(self.title)}</h1>"
            f'<p class="pairline"><span class="m1">model_1</span> <code>{_e(self.model_1)}</code>'
            f' &#160;vs&#160; <span class="m2">model_2</span> <code>{_e(self.model_2)}</code></p>'
            + (f"<p>{_e(self.description)}</p>" if self.description else "")
            + "</div></header>"
        )

    def _html_glance(self) -> str:
        cards = "".join(
            f'<div class="card"><div class="label">{_e(label)}</div>'
            f'<div class="value">{_e(value)}</div><div class="sub">{_e(sub)}</div></div>'
            for label, value, sub in self.glance()
        )
        return f'<div class="cards">{cards}</div>'

    def _html_notes(self) -> str:
        return "".join(f'<div class="note">{_e(n)}</div>' for n in dict.fromkeys(self.notes))

    def _html_comparison(self) -> str:
        comparison = self.run.comparison
        rows = []
        for name in comparison.get("ranking", []):
            c = comparison["categories"][name]
            kl, training = c["kl_divergence"], c.get("training") or {}
            rows.append(
                [
                    name,
                    c["num_records"],
                    _fmt(kl.get("mean")),
                    f"[{_fmt(kl.get('ci_low'))}, {_fmt(kl.get('ci_high'))}]",
                    _fmt(c["token_disagreement_rate"].get("mean"), 2),
                    _fmt(c["reliability"].get("mean"), 2),
                    f"{_fmt(training.get('soft_prompt_lift'), 2)}×",
                    f"{_fmt(c.get('top_k_lift'), 2)}×",
                ]
            )
        level = round(100 * comparison.get("confidence", 0.95))
        headers = ["category", "records", "mean KL", f"{level}% CI", "disagreement"]
        headers += ["reliability", "soft-prompt lift", f"top-{comparison.get('top_k', 5)} lift"]
        return (
            "<h2>Categories compared</h2>"
            '<p class="lead">One soft prompt and divergent dataset per category, ranked by the '
            "mean KL of its hard prompts (no soft prompt attached).</p>"
            + _table(headers, rows)
            + self.image(
                "comparison", "Mean KL per category (bootstrap CI) and the soft prompt's effect"
            )
        )

    def _html_training(self) -> str:
        training = self.image("training", "Divergence during training (Lightning's CSV log)")
        effect = self.image(
            "prompt_effect", "Validation divergence with and without the soft prompt"
        )
        if not (training or effect):
            return ""
        return (
            "<h2>Training</h2>"
            '<p class="lead">The soft prompt is trained to maximise the divergence of the frozen '
            "pair; the validation texts measure it with and without the prompt.</p>"
            f'<div class="row" style="grid-template-columns: 1.6fr 1fr">{training}{effect}</div>'
        )

    def _html_evaluation(self) -> str:
        if not self.run.evaluation and self.run.comparison is not None:
            rows = [
                [name, key, _fmt(value)]
                for name in self.run.comparison.get("ranking", [])
                for key, value in (
                    self.run.comparison["categories"][name].get("evaluation") or {}
                ).items()
                if key != "file"
            ]
            if rows:
                return (
                    "<h2>Against baselines</h2>"
                    '<p class="lead">From each category\'s <code>soft_prompting.evaluate</code> '
                    "summary.</p>" + _table(["category", "measure", "value"], rows, numeric=2)
                )
        if not self.run.evaluation:
            return (
                "<h2>Against baselines</h2><div class='note'>No evaluation summary in this run "
                "(run <code>python -m soft_prompting.evaluate</code> for lift over random texts "
                "and a random soft prompt).</div>"
            )
        path, _ = self.run.evaluation
        rows = [[k, _fmt(v)] for k, v in self.headline.items()]
        rows = rows or [["no lift or reliability numbers found", "–"]]
        return (
            "<h2>Against baselines</h2>"
            f'<p class="lead">From <code>{_e(path.relative_to(self.run.run_dir))}</code>: lift is '
            "the prompts' mean divergence over a baseline's; reliability the share of sampled "
            "continuations that differ.</p>" + _table(["measure", "value"], rows)
        )

    def _html_examples(self) -> str:
        cards = []
        for rank, record in enumerate(self.top_examples(), 1):
            metrics = record.get("metrics", {})
            marked_1, marked_2 = word_diff(record.get("generation_1"), record.get("generation_2"))
            chips = [
                ("hot", f"#{rank} · KL {_fmt(metrics.get('kl_divergence'))}"),
                ("", f"disagreement {_fmt(metrics.get('token_disagreement_rate'), 2)}"),
                ("", f"reliability {_fmt(metrics.get('reliability'), 2)}"),
                ("", f"category {record.get('category', '–')}"),
                ("", f"source {record.get('source', '–')}"),
            ]
            first = (metrics.get("disagreement_positions") or {}).get("first")
            if first is not None and first >= 0:
                chips.append(("", f"part at token {first}"))
            cards.append(
                '<div class="example"><div class="chips">'
                + "".join(f'<span class="chip {c}">{_e(t)}</span>' for c, t in chips)
                + f'</div><div class="prompt">{_e(record.get("prompt", ""))}</div>'
                + '<div class="gens">'
                + self._html_generation("one", "model_1", marked_1, "d1")
                + self._html_generation("two", "model_2", marked_2, "d2")
                + "</div></div>"
            )
        return (
            "<h2>Top hard prompts</h2>"
            '<p class="lead">Natural-language prompts, scored without the soft prompt, highest KL '
            "first. Both models continue the same prompt; the words where their continuations "
            "differ are highlighted.</p>" + "".join(cards)
        )

    @staticmethod
    def _html_generation(css: str, who: str, marked, mark: str) -> str:
        # Runs of differing words share one highlight, so a changed phrase reads as one.
        pieces, run = [], []
        for word, differs in [*marked, ("", False)]:
            if differs:
                run.append(_e(word))
                continue
            if run:
                pieces.append(f'<mark class="{mark}">{" ".join(run)}</mark>')
                run = []
            if word:
                pieces.append(_e(word))
        words = " ".join(pieces) or "<em>(empty)</em>"
        return f'<div class="gen {css}"><span class="who">{who}</span>{words}</div>'

    def _html_positions(self) -> str:
        tokens = self.analysis["preferred_tokens"]
        tables = []
        for key, title in (
            ("argmax_pairs", "Argmax tokens where the models disagree"),
            ("word_substitutions", "Word substitutions between the generations"),
        ):
            pairs = tokens.get(key)
            if not pairs:
                continue
            rows = [[p["model_1"], p["model_2"], p["count"]] for p in pairs[:10]]
            table = _table(["model_1", "model_2", "count"], rows, numeric=2, css=["m1", "m2"])
            tables.append(f"<div><h3>{_e(title)}</h3>{table}</div>")
        return (
            "<h2>Where the models part</h2>"
            '<p class="lead">Position 0 is the first token of the continuation. The argmax pairs '
            "are teacher-forced on model_1's continuation; the word substitutions come from a "
            "diff of the two sampled generations.</p>"
            + self.image("positions", "First disagreement and agreement along the continuation")
            + f'<div class="row">{"".join(tables)}</div>'
        )

    def _html_distributions(self) -> str:
        rows = []
        for group, stats in self.analysis["by_category"].items():
            kl, dis = stats.get("kl_divergence", {}), stats.get("token_disagreement_rate", {})
            rows.append(
                [group, kl.get("n", 0), _fmt(kl.get("mean")), _fmt(kl.get("median"))]
                + [_fmt(kl.get("max")), _fmt(dis.get("mean"), 2)]
            )
        sources = ", ".join(
            f"{_e(s)} ({v.get('kl_divergence', {}).get('n', 0)} records, mean KL "
            f"{_fmt(v.get('kl_divergence', {}).get('mean'))})"
            for s, v in self.analysis["by_source"].items()
        )
        return (
            "<h2>Divergence by category and strategy</h2>"
            + self.image("distributions", "Per-record metrics by category")
            + _table(["category", "records", "mean KL", "median", "max", "disagreement"], rows)
            + f'<p class="lead">Strategies (record source): {sources}.</p>'
            + self.image("correlations", "How the metrics move together (Spearman)")
        )

    def _html_semantic(self) -> str:
        semantic = self.analysis["semantic_similarity"]
        if semantic.get("per_record") is None:
            return ""

        def listing(indices, title):
            items = "".join(
                f"<li><code>{_e(_short(self.records[i].get('prompt')))}</code> → "
                f"<span class='g1'>{_e(_short(self.records[i].get('generation_1')))}</span> / "
                f"<span class='g2'>{_e(_short(self.records[i].get('generation_2')))}</span></li>"
                for i in indices[:5]
            )
            return f"<div><h3>{_e(title)}</h3><ul class='ex'>{items or '<li>none</li>'}</ul></div>"

        rho = semantic.get("spearman_with_kl")
        return (
            "<h2>Different words, or different behaviour?</h2>"
            f'<p class="lead">Cosine similarity of the two generations\' embeddings '
            f"({_e(semantic.get('method'))}) beside their KL; Spearman ρ with KL = {_fmt(rho, 2)}. "
            "Similarities rank records against each other (their absolute level means little), "
            "and a wrong number or fact embeds close to the right one: a sandbagged answer can "
            "sit among the similar pairs, so read them.</p>"
            + self.image("semantic", "KL against the similarity of the two generations")
            + '<div class="row">'
            + listing(semantic.get("behavioural", []), "High KL, different meaning")
            + listing(semantic.get("lexical_only", []), "Different words, similar embedding")
            + "</div>"
        )

    def _html_clusters(self) -> str:
        from soft_prompting.analysis.plots import PALETTE

        c = self.clusters
        blocks = []
        for cluster in c["clusters"]:
            label = cluster["cluster"]
            colour = "#bbbbbb" if label < 0 else PALETTE[label % len(PALETTE)]
            name = "noise (no cluster)" if label < 0 else f"cluster {label}"
            kl = cluster["metrics"].get("kl_divergence", {})
            categories = ", ".join(f"{k} {v}" for k, v in cluster["categories"].items())
            examples = "".join(
                f"<li><code>{_e(_short(ex['prompt']))}</code> → "
                f"<span class='g1'>{_e(_short(ex['generation_1']))}</span> / "
                f"<span class='g2'>{_e(_short(ex['generation_2']))}</span> "
                f"<span class='chip'>KL {_fmt(ex['kl_divergence'])}</span></li>"
                for ex in cluster["examples"]
            )
            words = ", ".join(cluster["distinguishing_words"]) or "–"
            blocks.append(
                f'<div class="cluster"><h3><span class="swatch" style="background:{colour}"></span>'
                f"{_e(name)} — {cluster['size']} examples, mean KL {_fmt(kl.get('mean'))}</h3>"
                f"<div class='chips'><span class='chip'>categories: {_e(categories)}</span>"
                f"<span class='chip'>distinctive words: {_e(words)}</span></div>"
                f"<ul class='ex'>{examples}</ul></div>"
            )
        return (
            "<h2>Behaviour clusters</h2>"
            f'<p class="lead">Examples embedded with {_e(c.get("embedding"))} '
            f"({_e(c['config']['features'])}), reduced with {_e(c['reducer'])} and clustered with "
            f"{_e(c['method'])}: {c['num_clusters']} clusters, {c['noise']} unclustered.</p>"
            + self.image("clusters", "Examples in 2-D, coloured by cluster and by divergence")
            + "".join(blocks)
        )

    def _html_setup(self) -> str:
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in self.setup_rows())
        full = OmegaConf.to_yaml(OmegaConf.create(self.run.config)) if self.run.config else ""
        return f"<h2>Run setup</h2><table>{rows}</table>" + (
            f"<details><summary>Full config</summary><pre>{_e(full)}</pre></details>"
            if full
            else ""
        )

    # ------------------------------------------------------------------ Markdown
    def markdown(self) -> str:
        def image(name: str, caption: str) -> list[str]:
            path = self.figures.get(name)
            if path is None:
                return []
            return [
                f"![{caption}]({path.resolve().relative_to(self.out_dir.resolve()).as_posix()})",
                "",
            ]

        lines = [
            f"# {self.title}",
            "",
            f"**model_1** `{self.model_1}` vs **model_2** `{self.model_2}`",
        ]
        if self.description:
            lines += ["", self.description]
        lines += ["", "| | | |", "|---|---:|---|"]
        lines += [f"| {label} | **{value}** | {sub} |" for label, value, sub in self.glance()]
        lines += [""] + [f"> {note}" for note in dict.fromkeys(self.notes)]
        if self.run.comparison is not None:
            from soft_prompting.report.comparison import comparison_table

            lines += ["", "## Categories compared", "", *comparison_table(self.run.comparison), ""]
            lines += image("comparison", "per category")
        lines += ["", "## Training", ""] + image("training", "training curve")
        lines += image("prompt_effect", "soft prompt vs none")
        lines += ["## Against baselines", ""]
        evaluations = {"": self.headline} if self.headline else {}
        if not evaluations and self.run.comparison is not None:
            evaluations = {
                f"{name}: ": c.get("evaluation") or {}
                for name, c in self.run.comparison["categories"].items()
            }
        shown = [
            f"- {prefix}{k}: {_fmt(v)}"
            for prefix, numbers in evaluations.items()
            for k, v in numbers.items()
            if k != "file"
        ]
        lines += shown or ["No evaluation summary in this run."]
        lines += ["", "## Top hard prompts", ""]
        for rank, record in enumerate(self.top_examples(), 1):
            m = record.get("metrics", {})
            marked_1, marked_2 = word_diff(record.get("generation_1"), record.get("generation_2"))

            def show(marked):
                return _markdown_marked(marked) or "∅"

            lines += [
                f"{rank}. `{record.get('prompt', '')}` — KL {_fmt(m.get('kl_divergence'))}, "
                f"category {record.get('category', '–')}, source {record.get('source', '–')}",
                f"   - model_1: {show(marked_1)}",
                f"   - model_2: {show(marked_2)}",
            ]
        lines += ["", "## Where the models part", ""] + image("positions", "positions")
        for key in ("argmax_pairs", "word_substitutions"):
            pairs = self.analysis["preferred_tokens"].get(key)
            if pairs:
                lines += [
                    f"**{key.replace('_', ' ')}**",
                    "",
                    "| model_1 | model_2 | count |",
                    "|---|---|---:|",
                ]
                lines += [f"| {p['model_1']} | {p['model_2']} | {p['count']} |" for p in pairs[:10]]
                lines += [""]
        lines += ["## Divergence by category and strategy", ""]
        lines += image("distributions", "distributions") + image("correlations", "correlations")
        lines += image("semantic", "semantic similarity")
        lines += ["## Behaviour clusters", ""] + image("clusters", "clusters")
        for cluster in self.clusters["clusters"]:
            kl = cluster["metrics"].get("kl_divergence", {})
            lines.append(
                f"- **cluster {cluster['cluster']}** ({cluster['size']} examples, mean KL "
                f"{_fmt(kl.get('mean'))}): {', '.join(cluster['distinguishing_words']) or '–'}"
            )
        lines += ["", "## Run setup", ""] + [f"- **{k}**: {v}" for k, v in self.setup_rows()]
        return "\n".join(lines) + "\n"


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
