"""The report's sections: one function each, from what the run directory holds to plain data.

Each function takes the :class:`ReportInputs` and returns a dict (or a list), or None when the run
has nothing for that section; the Jinja2 templates (``templates/report.html.j2`` and
``templates/report.md.j2``) render one block per section. Adding a section is one function listed in
:data:`SECTIONS` and one block in each template.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import OmegaConf

from soft_prompting.analysis.clustering import word_diff
from soft_prompting.report.findings import BEHAVIOUR_NAMES, find_behaviours, merged_findings

if TYPE_CHECKING:
    from soft_prompting.report.build import ReportConfig, RunContents


@dataclass
class ReportInputs:
    """Everything the sections read: the run's files, the analyses of its records, the figures."""

    run: RunContents
    records: list[dict]
    """The analysed records, highest KL first."""
    analysis: dict
    clusters: dict
    figures: dict[str, Path]
    notes: list[str]
    config: ReportConfig

    @property
    def pair(self) -> dict:
        return self.run.config.get("model_pair") or {}

    @cached_property
    def behaviours(self) -> list[dict]:
        """One description per cluster (see :func:`find_behaviours`), computed once."""
        return find_behaviours(self.records, self.clusters, evaluated_records(self))


# ---------------------------------------------------------------------------- small helpers
def fmt(value, digits: int = 3) -> str:
    """A number for a table; "–" for a missing or non-finite one."""
    if value is None or isinstance(value, bool):
        return "–" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}" if np.isfinite(value) else "–"
    return str(value)


def ratio(value, baseline, min_baseline: float, digits: int = 2) -> str:
    """``value`` as a lift ("3.32×"), or "n/a" naming why when its baseline is too small to divide by.

    A ratio over a near-zero baseline (a control the pair barely differs on) is huge and means
    nothing, so it is never shown as a number.
    """
    if value is None:
        return "–"
    if baseline is not None and baseline < min_baseline:
        return f"n/a (baseline {fmt(baseline, 4)} < {min_baseline:g})"
    return f"{fmt(value, digits)}×"


def short(text, limit: int = 150) -> str:
    """One line of at most ``limit`` characters."""
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def segments(marked: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Word-diff output with each run of same-status words joined: a changed phrase reads as one."""
    out: list[tuple[str, bool]] = []
    for word, differs in marked:
        if out and out[-1][1] == differs:
            out[-1] = (f"{out[-1][0]} {word}", differs)
        else:
            out.append((word, differs))
    return out


def figure(inputs: ReportInputs, name: str, caption: str) -> dict | None:
    path = inputs.figures.get(name)
    return {"name": name, "caption": caption} if path is not None and path.is_file() else None


def _number(node, *keys) -> float | None:
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node = node.get("value")
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _dig(node, *keys):
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _interval(block) -> str | None:
    """``{"value", "ci_low", "ci_high"}`` as "0.412 [0.300, 0.520]"; None when absent."""
    value = _number({"v": block}, "v")
    if value is None:
        return None
    low, high = _number(block, "ci_low"), _number(block, "ci_high")
    return fmt(value) + (
        f" [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else ""
    )


# ---------------------------------------------------------------------------- evidence
def evaluations(inputs: ReportInputs) -> list[dict]:
    """Each evaluation summary of the run (one per category in a comparison), read defensively."""
    return [
        evaluation_view(label, path, summary, inputs)
        for label, (path, summary, _) in inputs.run.evaluations.items()
    ]


def evaluation_view(label: str, path: Path, summary: dict, inputs: ReportInputs) -> dict:
    """The evidence of one ``soft_prompting.evaluate`` summary: lifts (with CIs), discoveries."""
    min_baseline = inputs.config.min_baseline
    lifts = summary.get("lifts")
    baselines = summary.get("baselines") or {}
    if not isinstance(lifts, dict):  # the first schema: two flat lifts
        lifts = {
            name: summary[f"lift_vs_{name}"]
            for name in ("random_text", "random_soft_prompt")
            if summary.get(f"lift_vs_{name}") is not None
        }
        baselines = {
            "random_text": summary.get("random_text") or {},
            "random_soft_prompt": summary.get("random_soft_prompt") or {},
        }
    rows = []
    for name, lift in lifts.items():
        value = _number({"v": lift}, "v")
        low, high = (
            _number(lift, k) if isinstance(lift, dict) else None for k in ("ci_low", "ci_high")
        )
        base = baselines.get(name) if isinstance(baselines.get(name), dict) else {}
        base_value = next(
            (
                _number(base, k)
                for k in ("kl_divergence", "mean", "value", "teacher_forced_divergence")
                if _number(base, k) is not None
            ),
            None,
        )
        rows.append(
            [
                name.replace("_", " "),
                ratio(value, base_value, min_baseline),
                f"[{fmt(low, 2)}, {fmt(high, 2)}]"
                if low is not None and not (base_value is not None and base_value < min_baseline)
                else "–",
                fmt(base_value, 4),
            ]
        )
    try:
        shown_path = path.relative_to(inputs.run.run_dir)
    except ValueError:
        shown_path = path
    return {
        "label": label,
        "path": str(shown_path),
        "num_prompts": summary.get("num_prompts"),
        "num_discoveries": summary.get("num_discoveries"),
        "discovery_rule": summary.get("discovery_rule"),
        "fdr_level": summary.get("fdr_level"),
        "effect": _interval(_dig(summary, "prompts", "effect")),
        "effect_measure": summary.get("effect_measure"),
        "reliability": _number(summary, "reliability")
        or _number(summary, "prompts", "reliability"),
        "reliability_baseline": _number(summary, "reliability_random_text")
        or _number(summary, "random_text", "reliability"),
        "lifts": rows,
        # Settings the evaluation was given that differ from the prompts' run (see evaluate)
        "unmatched": sorted(_dig(summary, "matched_to_run", "differ") or {}),
    }


def evaluated_records(inputs: ReportInputs) -> dict[str, dict]:
    """The evaluated record of each prompt (its discovery flag, q-value, effect), by prompt text."""
    return {
        str(r.get("prompt")): r
        for _, _, records in inputs.run.evaluations.values()
        for r in records
    }


# ---------------------------------------------------------------------------- the sections
def header(inputs: ReportInputs) -> dict:
    return {
        "title": inputs.config.title or inputs.run.config.get("name") or inputs.run.run_dir.name,
        "model_1": inputs.pair.get("model_1_name") or "model_1",
        "model_2": inputs.pair.get("model_2_name") or "model_2",
        "description": inputs.pair.get("description") or "",
    }


def glance(inputs: ReportInputs) -> list[dict]:
    """The cards at the top: ``label``, ``value``, ``sub``."""
    m, summary = inputs.run.metrics, inputs.analysis["summary"]
    cards = []
    with_prompt, without = m.get("val/divergence"), m.get("val/divergence_no_prompt")
    if with_prompt is not None and without is not None:
        cards.append(
            {
                "label": "soft prompt",
                "value": fmt(with_prompt),
                "sub": f"val divergence; {fmt(without)} without",
            }
        )
        lift = with_prompt / without if without else None
        cards.append(
            {
                "label": "soft-prompt lift",
                "value": ratio(lift, without, inputs.config.min_baseline),
                "sub": "with / without",
            }
        )
    cards.append(
        {
            "label": "hard prompts",
            "value": str(len(inputs.run.records)),
            "sub": "records in the dataset",
        }
    )
    kl = summary.get("kl_divergence", {})
    if kl.get("n"):
        cards.append(
            {
                "label": "mean KL",
                "value": fmt(kl["mean"]),
                "sub": f"max {fmt(kl['max'])} (nats / token)",
            }
        )
    views = evaluations(inputs)
    discoveries = [v["num_discoveries"] for v in views if isinstance(v["num_discoveries"], int)]
    if discoveries:
        prompts = sum(v["num_prompts"] or 0 for v in views if isinstance(v["num_discoveries"], int))
        cards.append(
            {
                "label": "discoveries",
                "value": str(sum(discoveries)),
                "sub": f"of {prompts} evaluated prompts",
            }
        )
    else:
        cards.append({"label": "discoveries", "value": "–", "sub": "not evaluated"})
    cards.append(
        {
            "label": "clusters",
            "value": str(inputs.clusters["num_clusters"]),
            "sub": f"{inputs.clusters['method']} on {inputs.clusters['reducer']}",
        }
    )
    return cards


def notes(inputs: ReportInputs) -> list[str]:
    return list(dict.fromkeys(inputs.notes))


def summary(inputs: ReportInputs) -> dict:
    """The finding in words: each behaviour found, per category what was found, what was not."""
    found_groups = inputs.behaviours
    found = merged_findings(
        inputs.records, inputs.clusters, inputs.behaviours, evaluated_records(inputs)
    )
    not_found = [
        f"{'Unclustered' if b['cluster'] < 0 else 'Cluster ' + str(b['cluster'])} "
        f"({b['size']} record{'s' if b['size'] != 1 else ''}): "
        + (
            f"{b['sentence']} But {b['why_not']}."
            if b["kind"] not in ("agree", "mixed") and b["cluster"] >= 0
            else f"{b['why_not']}."
        )
        for b in found_groups
        if not b["found"]
    ]
    not_found += [
        f"Cluster{'s' if ',' in b['clusters'] else ''} {b['clusters']} ({b['size']} records, "
        f"{b['summary_kind']}): none of its {b['evaluated']} evaluated prompts is a discovery, so "
        "the evaluation does not confirm that these prompts beat its baselines."
        for b in found
        if b["confirmed"] is False
    ]
    categories = []
    views = {v["label"]: v for v in evaluations(inputs)}
    evaluated = evaluated_records(inputs)
    comparison = inputs.run.comparison or {}
    names = comparison.get("ranking") or sorted({str(r.get("category")) for r in inputs.records})
    for name in names:
        in_category = [b for b in found if name in b["categories"]]
        view = views.get(name)
        mine = [r for r in inputs.records if str(r.get("category")) == name]
        training = (comparison.get("categories", {}).get(name) or {}).get("training") or {}
        baseline = training.get("val/divergence_no_prompt")
        parts = [f"{len(mine)} hard prompts"]
        flags = [evaluated.get(str(r.get("prompt")), {}).get("discovery") for r in mine]
        flags = [f for f in flags if isinstance(f, bool)]
        if view and isinstance(view["num_discoveries"], int):
            parts.append(f"{view['num_discoveries']} discoveries")
        elif flags:  # one evaluation of the whole run: count this category's prompts in it
            parts.append(f"{sum(flags)} discoveries of {len(flags)} evaluated prompts")
            if not any(flags):
                not_found.append(
                    f"Category {name}: no discoveries among its {len(flags)} evaluated prompts."
                )
        else:
            parts.append("not evaluated")
        said = Counter()
        for b in in_category:
            said[BEHAVIOUR_NAMES.get(b["kind"], f"“{b['phrase']}”")] += b["categories"][name]
        shown = [f"model_2 says {what} in {k}" for what, k in said.most_common()]
        line = {
            "name": name,
            "facts": ", ".join(parts),
            "behaviours": "; ".join(shown),
            "control": "",
        }
        if baseline is not None and baseline < inputs.config.min_baseline:
            line["control"] = (
                f"without a prompt the pair barely differs on these texts "
                f"({fmt(baseline, 4)} nats/token), so its soft-prompt lift is not a finding"
            )
        categories.append(line)
        if view and view["num_discoveries"] == 0:
            not_found.append(
                f"Category {name}: no discoveries among its {view['num_prompts']} evaluated prompts."
            )
        elif not in_category:
            not_found.append(f"Category {name}: none of its records shows a behaviour found above.")
        if line["control"]:
            not_found.append(f"Category {name} (control): {line['control']}.")
    if not inputs.run.evaluations:
        not_found.append(
            "No evaluation in this run: the behaviours above are not tested against baselines "
            "(run python -m soft_prompting.evaluate for discoveries and lifts)."
        )
    for b in found:
        ex = b["example"]
        b["example_segments"] = [
            segments(m) for m in word_diff(ex["generation_1"], ex["generation_2"])
        ]
    return {"found": found, "categories": categories, "not_found": not_found}


def comparison(inputs: ReportInputs) -> dict | None:
    comparison = inputs.run.comparison
    if comparison is None:
        return None
    rows = []
    for name in comparison.get("ranking", []):
        c = comparison["categories"][name]
        kl, training = c["kl_divergence"], c.get("training") or {}
        rows.append(
            [
                name,
                c["num_records"],
                fmt(kl.get("mean")),
                f"[{fmt(kl.get('ci_low'))}, {fmt(kl.get('ci_high'))}]",
                fmt(c["token_disagreement_rate"].get("mean"), 2),
                fmt(c["reliability"].get("mean"), 2),
                fmt(training.get("val/divergence_no_prompt"), 4),
                ratio(
                    training.get("soft_prompt_lift"),
                    training.get("val/divergence_no_prompt"),
                    inputs.config.min_baseline,
                ),
                f"{fmt(c.get('top_k_lift'), 2)}×",
            ]
        )
    level = round(100 * comparison.get("confidence", 0.95))
    return {
        "headers": [
            "category",
            "records",
            "mean KL",
            f"{level}% CI",
            "disagreement",
            "reliability",
            "no-prompt divergence",
            "soft-prompt lift",
            f"top-{comparison.get('top_k', 5)} lift",
        ],
        "rows": rows,
        "figure": figure(
            inputs, "comparison", "Mean KL per category (bootstrap CI) and the soft prompt's effect"
        ),
    }


def training(inputs: ReportInputs) -> dict | None:
    figures = [
        figure(inputs, "training", "Divergence during training (Lightning's CSV log)"),
        figure(inputs, "prompt_effect", "Validation divergence with and without the soft prompt"),
    ]
    figures = [f for f in figures if f]
    return {"figures": figures} if figures else None


def evaluation(inputs: ReportInputs) -> dict:
    """Against baselines: each evaluation summary's lifts, discoveries and reliability."""
    return {"evaluations": evaluations(inputs), "min_baseline": inputs.config.min_baseline}


def examples(inputs: ReportInputs) -> dict:
    """The top hard prompts side by side; a tag every card shares is said once, above them."""
    records = top_examples(inputs)
    cards = []
    for rank, record in enumerate(records, 1):
        metrics = record.get("metrics", {})
        first = (metrics.get("disagreement_positions") or {}).get("first")
        marked_1, marked_2 = word_diff(record.get("generation_1"), record.get("generation_2"))
        cards.append(
            {
                "rank": rank,
                "kl": fmt(metrics.get("kl_divergence")),
                "tags": {
                    "disagreement": fmt(metrics.get("token_disagreement_rate"), 2),
                    "reliability": fmt(metrics.get("reliability"), 2),
                    "category": str(record.get("category", "–")),
                    "source": str(record.get("source", "–")),
                    "part at token": str(first) if first is not None and first >= 0 else "–",
                },
                "prompt": record.get("prompt", ""),
                "generation_1": segments(marked_1),
                "generation_2": segments(marked_2),
            }
        )
    shared = {}
    if len(cards) > 1:
        for key in cards[0]["tags"]:
            values = {c["tags"][key] for c in cards}
            if len(values) == 1:
                shared[key] = values.pop()
    for card in cards:
        card["tags"] = {k: v for k, v in card["tags"].items() if k not in shared and v != "–"}
    shared = {k: v for k, v in shared.items() if v != "–"}
    return {"cards": cards, "shared": shared}


def highlighted_words(record: dict) -> dict | None:
    """A localised record's words with their attribution as a highlight intensity in [0, 1] (the
    divergence lost when the word alone is dropped, over the prompt's largest such loss; a word
    whose removal raises the divergence gets 0) and whether the word belongs to the ``trigger``.

    None when the record was not localised (no ``attributions``). Records of older datasets (no
    ``divergence_without_trigger``) used ``trigger`` for the shortest sub-prompt that still
    diverges: no word of theirs is marked, and that sub-prompt is shown as the context."""
    attributions = record.get("attributions")
    if not attributions:
        return None
    current = "divergence_without_trigger" in record
    trigger = str(record.get("trigger") or "") if current else ""
    context = str(record.get("trigger_context") or ("" if current else record.get("trigger") or ""))
    values = [max(0.0, float(a.get("attribution") or 0.0)) for a in attributions]
    top = max(values) or 1.0
    # The trigger's words are marked where their attribution is highest (a word may repeat).
    marked = [False] * len(attributions)
    for word in trigger.split():
        places = [i for i, a in enumerate(attributions) if a["word"] == word and not marked[i]]
        if places:
            marked[max(places, key=values.__getitem__)] = True
    words = [
        {"word": a["word"], "intensity": round(v / top, 3), "trigger": m}
        for a, v, m in zip(attributions, values, marked, strict=True)
    ]
    return {
        "words": words,
        "cut": len(str(record.get("prompt", "")).split()) > len(words),
        "trigger": trigger,
        "context": context,
    }


def triggers(inputs: ReportInputs) -> dict | None:
    """Which words of the top prompts carry the divergence: each word highlighted by its
    leave-one-out attribution, the trigger's words marked (see ``hard_prompts/triggers.py``)."""
    rows = []
    for rank, record in enumerate(top_examples(inputs), 1):
        shown = highlighted_words(record)
        if shown is not None:
            kl = fmt((record.get("metrics") or {}).get("kl_divergence"))
            rows.append({"rank": rank, "kl": kl, **shown})
    return {"rows": rows} if rows else None


def top_examples(inputs: ReportInputs) -> list[dict]:
    """The highest-KL records; in a comparison, the best of each category in ranking order."""
    if inputs.run.comparison is None:
        return inputs.records[: inputs.config.top_k]
    ranking = inputs.run.comparison.get("ranking") or []
    each = max(2, -(-inputs.config.top_k // max(1, len(ranking))))
    return [
        record
        for category in ranking
        for record in [r for r in inputs.records if r.get("category") == category][:each]
    ]


def positions(inputs: ReportInputs) -> dict:
    tokens = inputs.analysis["preferred_tokens"]
    tables = [
        {
            "title": title,
            "rows": [[p["model_1"], p["model_2"], p["count"]] for p in tokens[key][:10]],
        }
        for key, title in (
            ("argmax_pairs", "Argmax tokens where the models disagree"),
            ("word_substitutions", "Word substitutions between the generations"),
        )
        if tokens.get(key)
    ]
    return {
        "figure": figure(
            inputs, "positions", "First disagreement and agreement along the continuation"
        ),
        "tables": tables,
    }


def distributions(inputs: ReportInputs) -> dict:
    rows = []
    for group, stats in inputs.analysis["by_category"].items():
        kl, dis = stats.get("kl_divergence", {}), stats.get("token_disagreement_rate", {})
        rows.append(
            [
                group,
                kl.get("n", 0),
                fmt(kl.get("mean")),
                fmt(kl.get("median")),
                fmt(kl.get("max")),
                fmt(dis.get("mean"), 2),
            ]
        )
    sources = [
        f"{s} ({v.get('kl_divergence', {}).get('n', 0)} records, mean KL {fmt(v.get('kl_divergence', {}).get('mean'))})"
        for s, v in inputs.analysis["by_source"].items()
    ]
    return {
        "rows": rows,
        "sources": ", ".join(sources),
        "figure": figure(inputs, "distributions", "Per-record metrics by category"),
        "correlations": figure(inputs, "correlations", "How the metrics move together (Spearman)"),
    }


def semantic(inputs: ReportInputs) -> dict | None:
    result = inputs.analysis["semantic_similarity"]
    if result.get("per_record") is None:
        return None

    def listing(indices):
        return [
            {
                "prompt": short(inputs.records[i].get("prompt")),
                "generation_1": short(inputs.records[i].get("generation_1")),
                "generation_2": short(inputs.records[i].get("generation_2")),
            }
            for i in indices[:5]
        ]

    return {
        "method": result.get("method"),
        "rho": fmt(result.get("spearman_with_kl"), 2),
        "figure": figure(inputs, "semantic", "KL against the similarity of the two generations"),
        "behavioural": listing(result.get("behavioural", [])),
        "lexical_only": listing(result.get("lexical_only", [])),
    }


def clusters(inputs: ReportInputs) -> dict:
    from soft_prompting.analysis.plots import PALETTE

    c = inputs.clusters
    described = {b["cluster"]: b for b in inputs.behaviours}
    blocks = []
    for cluster in c["clusters"]:
        label = cluster["cluster"]
        blocks.append(
            {
                "name": "noise (no cluster)" if label < 0 else f"cluster {label}",
                "colour": "#bbbbbb" if label < 0 else PALETTE[label % len(PALETTE)],
                "size": cluster["size"],
                "mean_kl": fmt(cluster["metrics"].get("kl_divergence", {}).get("mean")),
                "categories": ", ".join(f"{k} {v}" for k, v in cluster["categories"].items()),
                "words": ", ".join(cluster["distinguishing_words"]) or "–",
                "sentence": described.get(label, {}).get("sentence", ""),
                "examples": [
                    {
                        "prompt": short(ex["prompt"]),
                        "generation_1": short(ex["generation_1"]),
                        "generation_2": short(ex["generation_2"]),
                        "kl": fmt(ex["kl_divergence"]),
                    }
                    for ex in cluster["examples"]
                ],
            }
        )
    return {
        "embedding": c.get("embedding"),
        "features": c["config"]["features"],
        "reducer": c["reducer"],
        "method": c["method"],
        "num_clusters": c["num_clusters"],
        "noise": c["noise"],
        "figure": figure(
            inputs, "clusters", "Examples in 2-D, coloured by cluster and by divergence"
        ),
        "blocks": blocks,
    }


def setup(inputs: ReportInputs) -> dict:
    c = inputs.run.config
    t, g, d = c.get("training") or {}, c.get("generation") or {}, c.get("data") or {}
    rows = [
        ("model_1", inputs.pair.get("model_1_name") or "model_1"),
        ("model_2", inputs.pair.get("model_2_name") or "model_2"),
        ("difference (as configured)", inputs.pair.get("description") or ""),
        (
            "soft prompt",
            f"{t.get('num_soft_prompt_tokens', '–')} virtual tokens, lr {t.get('learning_rate', '–')}, "
            f"divergence {t.get('divergence', '–')}",
        ),
        (
            "training",
            f"{t.get('num_epochs', '–')} epochs, max_steps {t.get('max_steps', '–')}, batch {t.get('batch_size', '–')}",
        ),
        (
            "generation",
            f"{g.get('num_prompts', '–')} prompts × {g.get('num_generations_per_prompt', '–')} samples, "
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
    environment = inputs.run.metrics.get("environment") or {}
    if environment:
        rows.append(("environment", ", ".join(f"{k} {v}" for k, v in environment.items())))
    full = OmegaConf.to_yaml(OmegaConf.create(c)) if c else ""
    return {"rows": [(k, str(v)) for k, v in rows if v], "full": full}


def footer(inputs: ReportInputs) -> dict:
    return {"run_dir": str(inputs.run.run_dir), "num_records": len(inputs.run.records)}


SECTIONS = (
    header,
    glance,
    notes,
    summary,
    comparison,
    training,
    evaluation,
    examples,
    triggers,
    positions,
    distributions,
    semantic,
    clusters,
    setup,
    footer,
)
"""The sections in page order; each template renders ``s.<function name>``."""


def build_sections(inputs: ReportInputs) -> dict[str, Any]:
    """Every section's data, by name (None for a section the run has nothing for)."""
    return {section.__name__: section(inputs) for section in SECTIONS}
