"""``comparison.md`` and the comparison table the report shows: rendered from ``comparison.json``
alone, so the report never imports the compare entrypoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _one_line(text, limit: int = 140) -> str:
    text = " ".join(str(text or "").split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def comparison_table(comparison: dict) -> list[str]:
    """The categories as Markdown table lines, ranked by mean KL."""
    level = round(100 * comparison["confidence"])
    lines = [
        f"| category | records | mean KL [{level}% CI] | token disagreement | reliability "
        "| soft-prompt lift | top-k lift | evaluation |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for name in comparison["ranking"]:
        c = comparison["categories"][name]
        kl = c["kl_divergence"]
        evaluation = c.get("evaluation") or {}
        shown = ", ".join(f"{k}={_fmt(v, 2)}" for k, v in evaluation.items() if k != "file") or "–"
        lines.append(
            f"| {name} | {c['num_records']} | {_fmt(kl.get('mean'))} "
            f"[{_fmt(kl.get('ci_low'))}, {_fmt(kl.get('ci_high'))}] "
            f"| {_fmt(c['token_disagreement_rate'].get('mean'), 2)} "
            f"| {_fmt(c['reliability'].get('mean'), 2)} "
            f"| {_fmt(c['training'].get('soft_prompt_lift'), 2)}× "
            f"| {_fmt(c.get('top_k_lift'), 2)}× | {shown} |"
        )
    return lines


def comparison_markdown(comparison: dict, plot: Path | None = None) -> str:
    """``comparison.md``: a table of the categories, then each one's top examples."""
    pair = comparison["model_pair"]
    lines = [
        f"# Comparison: {comparison['name']}",
        "",
        f"**model_1** `{pair['model_1_name']}` vs **model_2** `{pair['model_2_name']}`"
        + (f" — {pair['description']}" if pair.get("description") else ""),
        "",
        *comparison_table(comparison),
    ]
    if plot is not None:
        lines += ["", f"![per-category divergence]({Path(plot).name})"]
    lines += ["", "Definitions:", ""]
    lines += [f"- **{k}**: {v}" for k, v in comparison["definitions"].items()]
    for name in comparison["ranking"]:
        lines += ["", f"## {name}: top examples", ""]
        for i, ex in enumerate(comparison["categories"][name]["top_examples"], 1):
            lines += [
                f"{i}. KL {_fmt(ex['kl_divergence'])} — prompt: `{_one_line(ex['prompt'])}`",
                f"   - model_1: {_one_line(ex['generation_1'])}",
                f"   - model_2: {_one_line(ex['generation_2'])}",
            ]
    notes = [
        f"- {job['category']}: {note}"
        for job in comparison["jobs"]
        for note in job.get("notes", []) + [(job.get("evaluation") or {}).get("note")]
        if note
    ]
    notes += [
        f"- {j['category']}: FAILED — {j['error']}" for j in comparison["jobs"] if j.get("error")
    ]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"
