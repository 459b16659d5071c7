"""The PNG plots of the analysis, clustering, comparison and report, in one consistent style.

Matplotlib (Agg, no display) is imported inside each function, so importing this module costs
nothing. Every function writes one PNG and returns its path, or None when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PALETTE = ("#3366cc", "#dc6b2f", "#2a9d8f", "#a05195", "#e9c46a", "#6c757d", "#d1495b", "#5e60ce")
MODEL_1_COLOUR, MODEL_2_COLOUR = "#3366cc", "#dc6b2f"
NO_PROMPT_COLOUR, SOFT_PROMPT_COLOUR = "#b8bec6", "#1f2933"
"""Neutral colours for with/without the soft prompt, so they never read as a category."""
DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.titleweight": "bold",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.25,
            "legend.frameon": False,
        }
    )
    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _categories(records: list[dict]) -> list[str]:
    return sorted({str(r.get("category", "unknown")) for r in records})


def category_colours(categories) -> dict[str, str]:
    """The one colour of each category, in every plot: by its place in the sorted names.

    Every plot coloured by category takes its colours from here, so a category keeps its colour
    from the distributions to the comparison and the training curves.
    """
    names = sorted({str(c) for c in categories})
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def position_plot(positions: dict, path: Path) -> Path | None:
    """First-disagreement histogram, and per-position agreement/divergence curves."""
    counts = positions.get("first_disagreement_counts") or []
    if not counts and not positions.get("kl_by_position"):
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.0))
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.bar(range(len(counts)), counts, color=PALETTE[0], width=0.8)
    left.set_title("Where the models first part")
    left.set_xlabel("position in model_1's continuation (token)")
    left.set_ylabel("records")
    never = positions.get("never_disagree", 0)
    if never:
        left.text(0.98, 0.95, f"{never} never part", ha="right", va="top", transform=left.transAxes)
    still = [np.nan if v is None else v for v in positions.get("still_agreeing") or []]
    right.plot(range(len(still)), still, color=PALETTE[2], marker="o", ms=3, label="still agreeing")
    disagreement = positions.get("disagreement_by_position")
    if disagreement:
        values = [np.nan if v is None else v for v in disagreement]
        right.plot(
            range(len(values)),
            values,
            color=PALETTE[1],
            marker="o",
            ms=3,
            label="argmax differs here",
        )
    right.set_ylim(-0.03, 1.03)
    right.set_xlabel("position (token)")
    right.set_ylabel("share of records")
    right.set_title("Agreement along the continuation")
    kl = positions.get("kl_by_position")
    if kl:
        twin = right.twinx()
        twin.plot(
            range(len(kl)),
            [np.nan if v is None else v for v in kl],
            color=PALETTE[3],
            ls="--",
            label="mean KL (nats)",
        )
        twin.set_ylabel("mean KL(p1 || p2)", color=PALETTE[3])
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        lines = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        right.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    else:
        right.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def distribution_plot(
    records: list[dict], columns: dict[str, np.ndarray], path: Path
) -> Path | None:
    """Box plots with points of the first two metrics, one box per category."""
    names = [n for n in ("kl_divergence", "token_disagreement_rate") if n in columns]
    names = names or list(columns)[:2]
    if not records or not names:
        return None
    plt = _pyplot()
    categories = _categories(records)
    labels = np.asarray([str(r.get("category", "unknown")) for r in records])
    width = max(4.2, 1.2 + 0.9 * len(categories)) * len(names)
    fig, axes = plt.subplots(1, len(names), figsize=(min(width, 10), 3.0), squeeze=False)
    rng = np.random.default_rng(0)
    colours = category_colours(categories)
    for ax, name in zip(axes[0], names, strict=False):
        groups = [columns[name][labels == c] for c in categories]
        groups = [g[~np.isnan(g)] for g in groups]
        ax.boxplot(groups, showfliers=False, widths=0.5, medianprops={"color": "black"})
        for i, values in enumerate(groups):
            jitter = rng.uniform(-0.12, 0.12, size=values.size)
            colour = colours[categories[i]]
            ax.scatter(i + 1 + jitter, values, s=10, alpha=0.7, color=colour)
        ax.set_xticks(range(1, len(categories) + 1), categories, rotation=20, ha="right")
        ax.set_title(name.replace("_", " "))
    return _save(fig, path)


def correlation_plot(matrix: dict[str, dict], path: Path) -> Path | None:
    """Heat map of a correlation matrix ``{a: {b: r}}`` with the values written in."""
    names = list(matrix)
    if len(names) < 2:
        return None
    plt = _pyplot()
    values = np.asarray(
        [[np.nan if matrix[a][b] is None else matrix[a][b] for b in names] for a in names]
    )
    size = 1.4 + 0.55 * len(names)
    fig, ax = plt.subplots(figsize=(size + 0.9, size))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
    short = [
        n.replace("_similarity", "_sim")
        .replace("token_disagreement_rate", "disagreement")
        .replace("_divergence", "")
        for n in names
    ]
    ax.set_xticks(range(len(names)), short, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), short)
    ax.grid(False)
    for i in range(len(names)):
        for j in range(len(names)):
            text = "–" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(np.nan_to_num(values[i, j])) > 0.6 else "black",
            )
    ax.set_title("Spearman correlation between metrics")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def semantic_plot(
    records: list[dict], columns: dict[str, np.ndarray], semantic: dict, path: Path
) -> Path | None:
    """KL against the semantic similarity of the two generations, coloured by category."""
    if "kl_divergence" not in columns or semantic.get("per_record") is None:
        return None
    plt = _pyplot()
    kl = columns["kl_divergence"]
    similarity = np.asarray([np.nan if v is None else v for v in semantic["per_record"]])
    labels = [str(r.get("category", "unknown")) for r in records]
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    colours = category_colours(labels)
    for category in _categories(records):
        chosen = np.asarray([label == category for label in labels])
        ax.scatter(
            kl[chosen],
            similarity[chosen],
            s=16,
            alpha=0.8,
            label=category,
            color=colours[category],
        )
    ax.set_xlabel("KL divergence (nats / token)")
    ax.set_ylabel(f"similarity of generations ({semantic.get('method')})")
    ax.set_title("Different words, or different meaning?")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def cluster_plot(
    xy: np.ndarray, labels: np.ndarray, divergence: np.ndarray, path: Path, reducer: str
) -> Path | None:
    """Two scatter panels of the 2-D embedding: coloured by cluster and by divergence."""
    if len(xy) == 0:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    for label in sorted(set(labels.tolist())):
        chosen = labels == label
        colour = "#bbbbbb" if label < 0 else PALETTE[label % len(PALETTE)]
        name = "noise" if label < 0 else f"cluster {label}"
        left.scatter(xy[chosen, 0], xy[chosen, 1], s=18, color=colour, label=name, alpha=0.85)
    left.set_title("Behaviour clusters")
    left.legend(fontsize=7, loc="best", markerscale=0.8)
    points = right.scatter(xy[:, 0], xy[:, 1], c=divergence, cmap="viridis", s=18)
    fig.colorbar(points, ax=right, label="KL (nats / token)")
    right.set_title("Divergence")
    for ax in (left, right):
        ax.set_xlabel(f"{reducer} 1")
        ax.set_ylabel(f"{reducer} 2")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def training_plot(logs: dict[str, list[dict]], path: Path) -> Path | None:
    """Training divergence per step, with the validation divergence with and without the prompt.

    Args:
        logs: rows of Lightning's CSV log per run (one run, or one per category of a comparison).
    """

    def series(steps: list[dict], key: str) -> list[tuple[float, float]]:
        return [(r["step"], r[key]) for r in steps if r.get(key) is not None]

    logs = {
        name: steps
        for name, steps in logs.items()
        if series(steps, "train/divergence") or series(steps, "val/divergence")
    }
    if not logs:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(5.6, 3.0))
    several = len(logs) > 1
    colours = category_colours(logs)
    handles = []
    for name, steps in logs.items():
        colour = colours[name] if several else PALETTE[0]
        train, val = series(steps, "train/divergence"), series(steps, "val/divergence")
        base = series(steps, "val/divergence_no_prompt")
        if train:
            ax.plot(*zip(*train, strict=True), color=colour, lw=1.4)
        if val:
            ax.plot(
                *zip(*val, strict=True),
                color=colour if several else PALETTE[1],
                marker="o",
                ms=4,
                ls="" if several else "-",
            )
        if base:
            ax.plot(
                *zip(*base, strict=True),
                color=colour if several else PALETTE[5],
                marker="s",
                ms=4,
                ls=":",
            )
        if several:
            handles.append(Line2D([], [], color=colour, lw=2, label=name))
    grey = "#444444" if several else None
    handles += [
        Line2D([], [], color=grey or PALETTE[0], lw=1.4, label="train (soft prompt)"),
        Line2D(
            [],
            [],
            color=grey or PALETTE[1],
            marker="o",
            ms=4,
            ls="" if several else "-",
            label="validation (soft prompt)",
        ),
        Line2D(
            [],
            [],
            color=grey or PALETTE[5],
            marker="s",
            ms=4,
            ls=":",
            label="validation (no prompt)",
        ),
    ]
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("divergence (nats / token)")
    ax.set_title("Training curve")
    ax.legend(handles=handles, fontsize=7 if several else 8, loc="best")
    return _save(fig, path)


def comparison_plot(categories: dict[str, dict], path: Path) -> Path | None:
    """Mean KL per category with its confidence interval, and the soft prompt's effect."""
    names = [n for n, c in categories.items() if c.get("kl_divergence", {}).get("mean") is not None]
    if not names:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.0))
    stats = [categories[n]["kl_divergence"] for n in names]
    means = np.asarray([s["mean"] for s in stats])
    low = means - np.asarray([s.get("ci_low", s["mean"]) for s in stats])
    high = np.asarray([s.get("ci_high", s["mean"]) for s in stats]) - means
    colours = [category_colours(categories)[n] for n in names]
    left.bar(names, means, yerr=[low, high], color=colours, capsize=5, width=0.6)
    left.set_ylabel("mean KL of hard prompts (nats / token)")
    left.set_title("Divergence per category (95% CI)")
    with_prompt = [categories[n].get("training", {}).get("val/divergence") for n in names]
    without = [categories[n].get("training", {}).get("val/divergence_no_prompt") for n in names]
    x = np.arange(len(names))
    right.bar(
        x - 0.2,
        [np.nan if v is None else v for v in without],
        0.4,
        color=NO_PROMPT_COLOUR,
        label="no prompt",
    )
    right.bar(
        x + 0.2,
        [np.nan if v is None else v for v in with_prompt],
        0.4,
        color=SOFT_PROMPT_COLOUR,
        label="soft prompt",
    )
    right.set_xticks(x, names)
    right.set_ylabel("validation divergence")
    right.set_title("Soft prompt vs none (validation)")
    right.margins(y=0.3)
    right.legend(fontsize=8, loc="upper left", ncol=2)
    return _save(fig, path)


def prompt_effect_plot(metrics: dict, path: Path) -> Path | None:
    """Validation divergence with and without the soft prompt, as two bars."""
    with_prompt, without = metrics.get("val/divergence"), metrics.get("val/divergence_no_prompt")
    if with_prompt is None or without is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.2, 3.0))
    bars = ax.bar(
        ["no prompt", "soft prompt"],
        [without, with_prompt],
        color=[NO_PROMPT_COLOUR, SOFT_PROMPT_COLOUR],
        width=0.55,
    )
    for bar, value in zip(bars, (without, with_prompt), strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom")
    ax.set_ylabel("validation divergence")
    ax.set_title("Effect of the soft prompt")
    ax.margins(y=0.15)
    return _save(fig, path)
