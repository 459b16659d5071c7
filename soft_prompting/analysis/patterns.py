"""Where and how the two models of a pair part ways, read from a divergent dataset.

    from soft_prompting.analysis import DivergenceAnalyzer
    analysis = DivergenceAnalyzer(output_dir="outputs/run/analysis").analyze_divergence_patterns(
        "outputs/run/divergent_dataset.jsonl"
    )

:meth:`DivergenceAnalyzer.analyze_divergence_patterns` returns a plain dict (also written as
``analysis.json``) and draws PNG plots beside it:

- ``positions``: where in the continuation the models part. From the records alone: how many
  records first disagree at each position, and the share still agreeing up to each position.
  With the pair at hand (``pair=...``): the mean teacher-forced KL and the share of argmax
  disagreements at each position of model_1's continuation.
- ``preferred_tokens``: what each model says instead of the other. ``word_substitutions`` come
  from a word diff of the two generations (always); ``argmax_pairs`` are the two models' argmax
  tokens where they differ, teacher-forced on model_1's continuation (with the pair).
- ``by_category`` / ``by_source``: the distribution of every metric per category and per hard-prompt
  strategy.
- ``correlations``: Pearson and Spearman correlations between the metrics.
- ``semantic_similarity``: cosine similarity of the embeddings of the two generations beside their
  divergence, to tell "different words, same meaning" from a real behavioural difference.

``BehavioralClusteringAnalyzer`` (groups of divergent behaviours) lives in
:mod:`soft_prompting.analysis.clustering` and is re-exported here; UMAP is imported only when it runs.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from soft_prompting import run_files
from soft_prompting.errors import ConfigError
from soft_prompting.run_files import write_json

DEFAULT_METRICS = (
    "kl_divergence",
    "token_disagreement_rate",
    "vocab_jaccard_similarity",
    "reliability",
)
"""Record metrics analysed when ``metrics`` is None."""

MetricSpec = Sequence[str] | Mapping[str, Callable[[dict], float | None]] | None
"""Metric names of ``record["metrics"]``, or ``{name: record -> value}`` for computed ones."""

NO_TOKEN = "∅"
"""Stands for "nothing" on one side of a word substitution (an insertion or a deletion)."""


# ---------------------------------------------------------------------------- reading records
def load_records(dataset) -> list[dict]:
    """Records from a list of dicts, a ``.jsonl``/``.pt`` file, or a run directory.

    A run directory is searched for ``divergent_dataset.jsonl`` (then ``.pt``); a comparison
    directory (with one sub-directory per category) yields the records of every category. Files
    are read by :func:`soft_prompting.run_files.read_records`, the one safe reader of results: a
    ``.pt`` is never unpickled, and a file that is not a list of records is a :class:`DataError`.

    Raises:
        FileNotFoundError: a directory holds no divergent dataset.
        DataError: a file is missing, unreadable or holds something other than records.
    """
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        if path.is_dir():
            for name in (run_files.DATASET_JSONL, run_files.DATASET_PT):
                if (path / name).is_file():
                    return run_files.read_records(path / name)
            nested = sorted(path.glob(f"*/{run_files.DATASET_JSONL}"))
            if nested:
                return [record for file in nested for record in run_files.read_records(file)]
            raise FileNotFoundError(
                f"{path} holds no {run_files.DATASET_JSONL} or {run_files.DATASET_PT}"
            )
        return run_files.read_records(path)
    records = list(dataset)
    if records and not isinstance(records[0], Mapping):
        raise TypeError(
            f"a dataset is a list of record dicts or a path, got a list of {type(records[0])}"
        )
    return records


EVALUATION_SUMMARY = Path("evaluation") / "summary.json"
_NOT_EVALUATION = {"report", "clusters", "analysis", "wandb", "checkpoints", "logs", ".hydra"}


def find_evaluation_summary(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The summary ``soft_prompting.evaluate`` left in a run directory, if any.

    Looks for ``evaluation/summary.json`` first, then any other ``*summary*.json`` below
    ``run_dir`` (outside the folders of the report, clustering, W&B, checkpoints and logs, and
    not in another category's sub-run). Returns ``(path, content)``, or None.
    """
    import json

    run_dir = Path(run_dir)
    candidates = [run_dir / EVALUATION_SUMMARY]
    for path in sorted(run_dir.rglob("*summary*.json")):
        parts = set(path.relative_to(run_dir).parts[:-1])
        nested_run = any(
            (run_dir / Path(*path.relative_to(run_dir).parts[: i + 1]) / "metrics.json").is_file()
            for i in range(len(path.relative_to(run_dir).parts) - 1)
        )
        if not parts & _NOT_EVALUATION and not nested_run and path.name != "clusters_summary.json":
            candidates.append(path)
    for path in candidates:
        if path.is_file():
            try:
                content = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(content, dict):
                return path, content
    return None


def evaluation_headline(summary: dict, depth: int = 3) -> dict[str, float]:
    """The numbers of an evaluation summary whose key names lift or reliability (flattened).

    The evaluation's schema belongs to ``soft_prompting.evaluate``; this reads it defensively:
    any numeric value, up to ``depth`` levels down, under a key containing ``lift`` or
    ``reliability`` (e.g. ``lift_vs_random``, ``baselines/random_text/lift``).
    """
    found: dict[str, float] = {}

    def walk(node, prefix: str, level: int) -> None:
        if level > depth or not isinstance(node, dict):
            return
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}/", level + 1)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if "lift" in name.lower() or "reliab" in name.lower():
                    found[name] = float(value)

    walk(summary, "", 1)
    return found


def read_training_log(run_dir: str | Path) -> list[dict]:
    """Rows of Lightning's CSV log (``logs/metrics.csv``): ``step`` and the metrics logged then."""
    import csv

    path = Path(run_dir) / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                if value not in ("", None):
                    try:
                        parsed[key] = float(value)
                    except ValueError:
                        parsed[key] = value
            if "step" in parsed:
                rows.append(parsed)
    return rows


def resolve_metrics(metrics: MetricSpec) -> dict[str, Callable[[dict], float | None]]:
    """``{name: record -> value}`` for a metric spec (None: :data:`DEFAULT_METRICS`)."""
    if metrics is None:
        metrics = DEFAULT_METRICS
    if isinstance(metrics, str):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        return dict(metrics)
    if not isinstance(metrics, Sequence) or not all(isinstance(m, str) for m in metrics):
        raise TypeError(
            "metrics must be None, metric names of record['metrics'] (e.g. ['kl_divergence']) or "
            f"a mapping {{name: record -> float}}, not {type(metrics).__name__}"
        )

    def getter(name: str):
        return lambda record: record.get("metrics", {}).get(name)

    return {name: getter(name) for name in metrics}


def metric_values(records: list[dict], metric: Callable[[dict], float | None]) -> np.ndarray:
    """One float per record (NaN where the record lacks the metric)."""
    values = []
    for record in records:
        value = metric(record)
        values.append(float(value) if isinstance(value, (int, float)) else math.nan)
    return np.asarray(values, dtype=np.float64)


# ---------------------------------------------------------------------------- statistics
def describe(values: np.ndarray) -> dict:
    """Count, mean, sample standard deviation, median, quartiles and range (NaNs ignored)."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"n": 0}
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "median": float(np.median(values)),
        "q25": float(np.quantile(values, 0.25)),
        "q75": float(np.quantile(values, 0.75)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def correlation_matrices(columns: dict[str, np.ndarray]) -> dict[str, dict]:
    """Pearson and Spearman correlations of every pair of columns (None where undefined).

    Rows with a NaN in either column of a pair are dropped for that pair.
    """
    from scipy.stats import pearsonr, spearmanr

    result: dict[str, dict] = {"pearson": {}, "spearman": {}}
    names = list(columns)
    for a in names:
        for kind in result:
            result[kind][a] = {}
        for b in names:
            x, y = columns[a], columns[b]
            keep = ~(np.isnan(x) | np.isnan(y))
            x, y = x[keep], y[keep]
            defined = x.size >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0
            for kind, fn in (("pearson", pearsonr), ("spearman", spearmanr)):
                result[kind][a][b] = float(fn(x, y)[0]) if defined else None
    return result


# ---------------------------------------------------------------------------- positions and tokens
def position_profile(records: list[dict]) -> dict:
    """Where the continuations part, from each record's ``disagreement_positions``.

    Returns:
        ``first_disagreement_counts[t]``: records whose first disagreement is at position ``t``;
        ``never_disagree``: records without any; ``still_agreeing[t]``: among records whose
        continuation reaches position ``t``, the share that agreed at every position up to ``t``.
    """
    firsts, lengths = [], []
    for record in records:
        positions = record.get("metrics", {}).get("disagreement_positions") or {}
        if "first" in positions and "length" in positions:
            firsts.append(int(positions["first"]))
            lengths.append(int(positions["length"]))
    horizon = max(lengths, default=0)
    counts = [sum(first == t for first in firsts) for t in range(horizon)]
    still = []
    for t in range(horizon):
        reaching = [f for f, n in zip(firsts, lengths, strict=True) if n > t]
        agreeing = [f for f in reaching if f == -1 or f > t]
        still.append(len(agreeing) / len(reaching) if reaching else None)
    return {
        "records": len(firsts),
        "first_disagreement_counts": counts,
        "never_disagree": sum(first == -1 for first in firsts),
        "still_agreeing": still,
    }


def word_substitutions(
    records: list[dict], max_words: int = 3, insertions: bool = False
) -> Counter:
    """``(model_1 words, model_2 words)`` counts from a word diff of the two generations.

    Each replaced span of the diff counts once (cut to ``max_words`` words). Spans only one model
    wrote (a longer or shorter continuation, mostly) count only with ``insertions=True``, with
    :data:`NO_TOKEN` on the empty side.
    """
    pairs: Counter = Counter()
    for record in records:
        words_1 = str(record.get("generation_1", "")).split()
        words_2 = str(record.get("generation_2", "")).split()
        matcher = difflib.SequenceMatcher(a=words_1, b=words_2, autojunk=False)
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op == "equal" or (op != "replace" and not insertions):
                continue
            left = " ".join(words_1[i1:i2][:max_words]) or NO_TOKEN
            right = " ".join(words_2[j1:j2][:max_words]) or NO_TOKEN
            pairs[(left, right)] += 1
    return pairs


@torch.no_grad()
def teacher_forced_profile(
    pair, records: list[dict], batch_size: int = 16, progress: bool = True
) -> dict:
    """Per-position KL and argmax disagreements of the pair on model_1's re-tokenised continuation.

    Returns:
        ``kl_by_position[t]`` (mean KL(p1 || p2) over the records reaching ``t``),
        ``disagreement_by_position[t]`` (share of them whose argmax tokens differ),
        ``records_by_position[t]`` and ``argmax_pairs`` (a Counter of ``(token_1, token_2)``).
    """
    from soft_prompting.hard_prompts.sampling import teacher_forced_logits
    from soft_prompting.maths.divergence import forward_kl

    tokenizer = pair.tokenizer
    kl_sum: list[float] = []
    differ_sum: list[int] = []
    reach: list[int] = []
    pairs: Counter = Counter()
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="teacher-forced scoring", disable=not progress):
        chunk = records[start : start + batch_size]
        ids = [
            tokenizer(str(r.get("generation_1", "")), add_special_tokens=False)["input_ids"]
            for r in chunk
        ]
        width = max((len(x) for x in ids), default=0)
        if width == 0:
            continue
        tokens = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, row_ids in enumerate(ids):
            tokens[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            mask[row, : len(row_ids)] = True
        prompts = [str(r.get("prompt", "")) for r in chunk]
        tokens = tokens.to(pair.device)
        # Padding sits after each continuation, so causal attention keeps it out of real positions.
        logits_1 = teacher_forced_logits(pair.model_1, pair, prompts, tokens, 1).cpu()
        logits_2 = teacher_forced_logits(pair.model_2, pair, prompts, tokens, 1).cpu()
        kl = forward_kl(logits_1, logits_2)
        top_1, top_2 = logits_1.argmax(-1), logits_2.argmax(-1)
        while len(kl_sum) < width:
            kl_sum.append(0.0)
            differ_sum.append(0)
            reach.append(0)
        for row in range(len(chunk)):
            for t in range(int(mask[row].sum())):
                kl_sum[t] += float(kl[row, t])
                reach[t] += 1
                if top_1[row, t] != top_2[row, t]:
                    differ_sum[t] += 1
                    pairs[
                        (
                            tokenizer.decode([int(top_1[row, t])]),
                            tokenizer.decode([int(top_2[row, t])]),
                        )
                    ] += 1
    return {
        "kl_by_position": [s / n if n else None for s, n in zip(kl_sum, reach, strict=True)],
        "disagreement_by_position": [
            d / n if n else None for d, n in zip(differ_sum, reach, strict=True)
        ],
        "records_by_position": reach,
        "argmax_pairs": pairs,
    }


def top_pairs(counter: Counter, k: int) -> list[dict]:
    return [
        {"model_1": a, "model_2": b, "count": n}
        for (a, b), n in sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:k]
    ]


# ---------------------------------------------------------------------------- the analyzer
class DivergenceAnalyzer:
    """Patterns of divergence in a dataset of records (see the module docstring for the outputs).

    Args:
        metrics: record metrics to analyse: names in ``record["metrics"]``, or a mapping
            ``{name: record -> float}``; None means :data:`DEFAULT_METRICS`.
        output_dir: where ``analysis.json`` and the PNG plots go (None: nothing is written).
        pair: the frozen :class:`~soft_prompting.pair.loading.ModelPair`; enables the teacher-forced
            position profile, the argmax token pairs and hidden-state semantic similarity.
        semantic: how generations are embedded for semantic similarity: ``auto`` (the pair's
            hidden states when a pair is given, else skipped), ``hidden_states``, ``minilm`` (the
            ``semantic`` extra), ``none``, or a callable ``texts -> [N, D] array``.
        top_k: token pairs and examples listed.
        batch_size: texts per forward pass of the pair.
        progress: show progress bars.
    """

    def __init__(
        self,
        metrics: MetricSpec = None,
        output_dir: str | Path | None = None,
        pair=None,
        semantic: str | Callable = "auto",
        top_k: int = 15,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        self.metrics = resolve_metrics(metrics)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.pair = pair
        self.semantic = semantic
        self.top_k = top_k
        self.batch_size = batch_size
        self.progress = progress
        if semantic == "hidden_states" and pair is None:
            raise ConfigError("semantic='hidden_states' needs the model pair: pass pair=...")

    def analyze_divergence_patterns(self, dataset) -> dict:
        """Analyse ``dataset`` (records, a file or a run directory); write JSON + plots.

        Returns:
            A plain, JSON-serialisable dict (see the module docstring for its keys).
        """
        records = load_records(dataset)
        notes: list[str] = []
        columns = {name: metric_values(records, fn) for name, fn in self.metrics.items()}
        analysis: dict = {
            "num_records": len(records),
            "metrics": list(self.metrics),
            "summary": {name: describe(values) for name, values in columns.items()},
            "positions": position_profile(records),
            "preferred_tokens": {
                "word_substitutions": top_pairs(word_substitutions(records), self.top_k),
                "argmax_pairs": None,
            },
            "by_category": self._grouped(records, columns, "category"),
            "by_source": self._grouped(records, columns, "source"),
        }
        if self.pair is not None and records:
            profile = teacher_forced_profile(self.pair, records, self.batch_size, self.progress)
            analysis["preferred_tokens"]["argmax_pairs"] = top_pairs(
                profile.pop("argmax_pairs"), self.top_k
            )
            analysis["positions"] |= profile
        semantic = self._semantic_similarity(records, columns, notes)
        analysis["semantic_similarity"] = semantic
        if semantic.get("per_record") is not None:
            columns = columns | {
                "semantic_similarity": np.asarray(
                    [math.nan if v is None else v for v in semantic["per_record"]]
                )
            }
        analysis["correlations"] = correlation_matrices(columns)
        if len(records) < 3:
            notes.append(f"only {len(records)} record(s): distributions and correlations are thin")
        analysis["notes"] = notes
        analysis["plots"] = {}
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            analysis["plots"] = self._plot(records, analysis, columns)
            write_json(self.output_dir / "analysis.json", _json_safe(analysis))
        return _json_safe(analysis)

    # ------------------------------------------------------------------ parts
    def _grouped(self, records: list[dict], columns: dict, key: str) -> dict:
        groups: dict[str, list[int]] = {}
        for index, record in enumerate(records):
            groups.setdefault(str(record.get(key, "unknown")), []).append(index)
        return {
            group: {name: describe(values[indices]) for name, values in columns.items()}
            for group, indices in sorted(groups.items())
        }

    def _embedder(self, notes: list[str]):
        from soft_prompting.analysis import embeddings

        if callable(self.semantic):
            return "custom", self.semantic
        choice = self.semantic
        if choice == "auto":
            choice = "hidden_states" if self.pair is not None else "none"
        if choice == "none":
            notes.append(
                "semantic similarity skipped: pass the model pair (hidden states) or "
                "semantic='minilm' (the 'semantic' extra)"
            )
            return None, None
        if choice == "hidden_states":
            return choice, embeddings.hidden_state_embedder(
                self.pair, self.batch_size, self.progress
            )
        if choice == "minilm":
            return choice, embeddings.minilm_embedder(progress=self.progress)
        raise ConfigError(
            f"semantic={choice!r}: use auto, hidden_states, minilm, none or a callable"
        )

    def _semantic_similarity(self, records: list[dict], columns: dict, notes: list[str]) -> dict:
        from soft_prompting.analysis.embeddings import cosine_rows

        method, embed = self._embedder(notes)
        if embed is None or not records:
            return {"method": method, "per_record": None}
        texts_1 = [str(r.get("generation_1", "")) for r in records]
        texts_2 = [str(r.get("generation_2", "")) for r in records]
        vectors = np.asarray(embed(texts_1 + texts_2))
        similarity = cosine_rows(vectors[: len(records)], vectors[len(records) :])
        identical = np.asarray([a == b for a, b in zip(texts_1, texts_2, strict=True)])
        similarity = np.where(identical, 1.0, similarity)
        result = {
            "method": method,
            "per_record": [None if math.isnan(v) else float(v) for v in similarity],
            "summary": describe(similarity),
            "spearman_with_kl": None,
            "lexical_only": [],
            "behavioural": [],
        }
        kl = columns.get("kl_divergence")
        if kl is None:
            kl = metric_values(records, resolve_metrics(["kl_divergence"])["kl_divergence"])
        keep = ~(np.isnan(kl) | np.isnan(similarity))
        if keep.sum() >= 2 and np.ptp(kl[keep]) > 0 and np.ptp(similarity[keep]) > 0:
            from scipy.stats import spearmanr

            result["spearman_with_kl"] = float(spearmanr(kl[keep], similarity[keep])[0])
        if keep.sum() >= 4:
            # Quartiles of this dataset, so the split works whatever the embedder's scale.
            high_sim, low_sim = np.nanquantile(similarity, 0.75), np.nanquantile(similarity, 0.25)
            high_kl = np.nanquantile(kl, 0.75)
            jaccard = metric_values(
                records, resolve_metrics(["vocab_jaccard_similarity"])["vocab_jaccard_similarity"]
            )
            for i in np.flatnonzero(keep):
                if similarity[i] >= high_sim and not identical[i] and not jaccard[i] >= 0.5:
                    result["lexical_only"].append(int(i))
                if similarity[i] <= low_sim and kl[i] >= high_kl:
                    result["behavioural"].append(int(i))
        result["definitions"] = {
            "lexical_only": "different words (vocab Jaccard < 0.5), meaning close: similarity in "
            "this dataset's top quartile",
            "behavioural": "KL in this dataset's top quartile, similarity in its bottom quartile",
        }
        return result

    # ------------------------------------------------------------------ plots
    def _plot(self, records: list[dict], analysis: dict, columns: dict) -> dict[str, str]:
        from soft_prompting.analysis import plots

        out = self.output_dir
        paths = {
            "positions": plots.position_plot(analysis["positions"], out / "positions.png"),
            "distributions": plots.distribution_plot(records, columns, out / "distributions.png"),
            "correlations": plots.correlation_plot(
                analysis["correlations"]["spearman"], out / "correlations.png"
            ),
        }
        if analysis["semantic_similarity"].get("per_record") is not None:
            paths["semantic"] = plots.semantic_plot(
                records, columns, analysis["semantic_similarity"], out / "semantic.png"
            )
        return {name: str(path) for name, path in paths.items() if path is not None}


def _json_safe(value):
    """NaN/inf to None, numpy scalars to Python, tuples to lists, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
