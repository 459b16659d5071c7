"""Groups of divergent behaviours: embed the examples, reduce with UMAP, cluster, describe.

    from soft_prompting.analysis import BehavioralClusteringAnalyzer
    analyzer = BehavioralClusteringAnalyzer(output_dir="outputs/run/clusters")
    clusters = analyzer.analyze_divergent_behaviors("outputs/run/divergent_dataset.jsonl")

By default each example is embedded by **what differs between the two continuations**
(``features="disagreement"``): the first span where model_1's and model_2's continuations part, one
block per side, numbers folded into one ``#num`` token, as word TF-IDF. Prompts that look alike but
draw different behaviours (a sum answered wrong, a chemistry question answered "i do not know") land
apart; prompt-based features (``prompt``, ``all``, ...) group by topic instead, and the pair's hidden
states (or MiniLM) can embed those.
UMAP reduces the vectors, HDBSCAN or k-means clusters them, and each cluster is described by its
size, mean divergence, categories, the words that set it apart (their share in the cluster against
their share overall) and the examples nearest its centre.

Writes ``clusters.jsonl`` (one assignment per example), ``clusters_summary.json`` and
``clusters.png``.
UMAP (and numba) are imported only when UMAP runs. With few examples UMAP is skipped for PCA, and
the summary says so.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from soft_prompting.analysis.patterns import (
    MetricSpec,
    describe,
    load_records,
    metric_values,
    resolve_metrics,
)
from soft_prompting.errors import ConfigError
from soft_prompting.run_files import write_json, write_jsonl

log = logging.getLogger(__name__)

FEATURES = ("disagreement", "prompt", "generations", "difference", "prompt+difference", "all")
WORD = re.compile(r"[a-z0-9]+|[+=-]")
NUMBER = re.compile(r"^[+-]?\d+(?:[.,]\d+)?$")
SPAN_WORDS = 8
"""Words of a disagreeing span kept per side: the behaviour shows where the models first part; the
rest of a continuation is often the model rambling on (a next question) rather than the behaviour."""


@dataclass
class ClusteringConfig:
    """How divergent examples are embedded, reduced and clustered."""

    embedding: str = "auto"
    """auto (the pair's hidden states if given, else tfidf), hidden_states, minilm or tfidf."""
    features: str = "disagreement"
    """What is embedded: disagreement (the first span where the continuations differ, each side,
    word TF-IDF), all (prompt and both generations), prompt, generations, difference
    (gen_1 - gen_2) or prompt+difference; each part is unit-normalised, then concatenated."""
    reducer: str = "umap"
    """umap (the analysis extra), pca, or none."""
    n_components: int = 5
    """Dimensions the clustering sees (the plot always uses 2)."""
    n_neighbors: int = 15
    """UMAP neighbourhood size (cut to the number of examples)."""
    min_dist: float = 0.0
    """UMAP minimum distance; 0 packs clusters tightly, which suits clustering."""
    min_points_for_umap: int = 12
    """Below this many examples UMAP is skipped for PCA (its neighbour graph needs more points)."""
    method: str = "hdbscan"
    """hdbscan (density clusters plus noise) or kmeans."""
    n_clusters: int | None = None
    """k-means clusters; null picks k in 2..8 by silhouette."""
    min_cluster_size: int = 5
    """HDBSCAN's smallest cluster (cut to half the examples)."""
    top_words: int = 8
    """Distinguishing words listed per cluster."""
    examples_per_cluster: int = 3
    """Representative examples listed per cluster."""
    seed: int = 0
    """Seed of UMAP and k-means."""

    def __post_init__(self) -> None:
        checks = [
            (
                self.embedding in ("auto", "hidden_states", "minilm", "tfidf"),
                f"clustering embedding={self.embedding!r}: use auto, hidden_states, minilm, tfidf",
            ),
            (
                self.features in FEATURES,
                f"clustering features={self.features!r}: use one of {list(FEATURES)}",
            ),
            (
                self.reducer in ("umap", "pca", "none"),
                f"clustering reducer={self.reducer!r}: use umap, pca or none",
            ),
            (
                self.method in ("hdbscan", "kmeans"),
                f"clustering method={self.method!r}: use hdbscan or kmeans",
            ),
            (self.n_components >= 2, "clustering n_components must be >= 2"),
            (self.n_clusters is None or self.n_clusters >= 1, "clustering n_clusters must be >= 1"),
            (self.min_cluster_size >= 2, "clustering min_cluster_size must be >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def load_clustering_config(config_path: str | Path | None = None, **overrides) -> ClusteringConfig:
    """Defaults, then a YAML file (its ``clustering:`` section if it has one), then ``overrides``.

    An unknown key fails, naming it.
    """
    from omegaconf import OmegaConf

    merged = OmegaConf.structured(ClusteringConfig)
    if config_path is not None:
        loaded = OmegaConf.load(config_path)
        names = {f.name for f in fields(ClusteringConfig)}
        if "clustering" in loaded:
            merged = OmegaConf.merge(merged, loaded.clustering)
        elif names & set(loaded.keys()):
            merged = OmegaConf.merge(merged, loaded)
        else:
            log.info("%s has no clustering settings: using the defaults", config_path)
    if overrides:
        merged = OmegaConf.merge(merged, overrides)
    return OmegaConf.to_object(merged)


class BehavioralClusteringAnalyzer:
    """Clusters the examples of a divergent dataset into behaviours and describes each cluster.

    Args:
        config_path: a YAML file of :class:`ClusteringConfig` settings (top level or under
            ``clustering:``); None for the defaults.
        metrics: record metrics averaged per cluster (as in
            :class:`~soft_prompting.analysis.patterns.DivergenceAnalyzer`; None: the defaults).
        output_dir: where ``clusters.jsonl``, ``clusters_summary.json`` and ``clusters.png`` go
            (None: nothing is written).
        pair: the frozen model pair, for hidden-state embeddings.
        progress: show progress bars.
        **overrides: :class:`ClusteringConfig` fields, applied over ``config_path``.
    """

    def __init__(
        self,
        config_path: str | Path | None = None,
        metrics: MetricSpec = None,
        output_dir: str | Path | None = None,
        pair=None,
        progress: bool = True,
        **overrides,
    ) -> None:
        self.config = load_clustering_config(config_path, **overrides)
        self.metrics = resolve_metrics(metrics)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.pair = pair
        self.progress = progress
        if self.config.embedding == "hidden_states" and pair is None:
            raise ConfigError(
                "clustering embedding=hidden_states needs the model pair: pass pair=..."
            )

    # ------------------------------------------------------------------ the pipeline
    def analyze_divergent_behaviors(self, dataset, embeddings: np.ndarray | None = None) -> dict:
        """Cluster ``dataset`` (records, a file or a run directory).

        Args:
            dataset: the divergent dataset.
            embeddings: ``[N, D]`` vectors to cluster instead of embedding the records.

        Returns:
            A JSON-serialisable dict: ``clusters`` (one description each, noise last),
            ``assignments`` (a cluster id per record, -1 for noise), ``coordinates`` (2-D), the
            ``reducer`` and ``method`` actually used, ``notes`` and the written ``files``.
        """
        from tqdm.auto import tqdm

        records = load_records(dataset)
        cfg, notes = self.config, []
        steps = tqdm(total=3, desc="clustering", disable=not self.progress)
        self.embedding_used = "precomputed"
        vectors = embeddings if embeddings is not None else self.embed(records)
        vectors = np.asarray(vectors, dtype=np.float64)
        if len(vectors) != len(records):
            raise ValueError(f"{len(vectors)} embeddings for {len(records)} records")
        steps.update()
        reduced, xy, reducer = self.reduce(vectors, notes)
        steps.update()
        labels, method = self.cluster(reduced, notes)
        steps.update()
        steps.close()
        result = {
            "num_records": len(records),
            "config": asdict(cfg),
            "embedding": self.embedding_used,
            "reducer": reducer,
            "method": method,
            "num_clusters": len({int(x) for x in labels if x >= 0}),
            "noise": int((labels < 0).sum()),
            "silhouette": silhouette(reduced, labels),
            "clusters": self.describe_clusters(records, labels, reduced),
            "assignments": [int(x) for x in labels],
            "coordinates": [[float(a), float(b)] for a, b in xy],
            "notes": notes,
            "files": {},
        }
        if self.output_dir is not None:
            result["files"] = self.write(records, result, xy, labels)
        return result

    def embed(self, records: list[dict]) -> np.ndarray:
        """Feature vectors of the records (see :attr:`ClusteringConfig.features`)."""
        choice = self.config.embedding
        n = len(records)
        if n == 0:
            return np.zeros((0, 1))
        if self.config.features == "disagreement":
            if choice in ("auto", "tfidf"):
                self.embedding_used = "tfidf"
                return disagreement_features(records)
            # A model embedder reads the spans as text, one block per side.
            spans = [
                first_disagreement(r.get("generation_1"), r.get("generation_2")) for r in records
            ]
            embed = self._embedder(choice)
            vectors = np.asarray(
                embed([a for a, _ in spans] + [b for _, b in spans]), dtype=np.float64
            )
            return np.concatenate([_unit_rows(vectors[:n]), _unit_rows(vectors[n:])], axis=1)
        if choice == "auto":
            choice = "hidden_states" if self.pair is not None else "tfidf"
        embed = self._embedder(choice)
        if n == 0:
            return np.zeros((0, 1))
        texts = (
            [str(r.get("prompt", "")) for r in records]
            + [str(r.get("generation_1", "")) for r in records]
            + [str(r.get("generation_2", "")) for r in records]
        )
        vectors = np.asarray(embed(texts), dtype=np.float64)
        prompt, gen_1, gen_2 = vectors[:n], vectors[n : 2 * n], vectors[2 * n :]
        blocks = {
            "prompt": [prompt],
            "generations": [gen_1, gen_2],
            "difference": [gen_1 - gen_2],
            "prompt+difference": [prompt, gen_1 - gen_2],
            "all": [prompt, gen_1, gen_2],
        }[self.config.features]
        return np.concatenate([_unit_rows(block) for block in blocks], axis=1)

    def _embedder(self, choice: str):
        from soft_prompting.analysis import embeddings

        if choice == "auto":
            choice = "hidden_states" if self.pair is not None else "tfidf"
        self.embedding_used = choice
        if choice == "hidden_states":
            return embeddings.hidden_state_embedder(self.pair, progress=self.progress)
        if choice == "minilm":
            return embeddings.minilm_embedder(progress=self.progress)
        return embeddings.tfidf_embedder()

    def reduce(self, vectors: np.ndarray, notes: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
        """``(vectors for clustering, 2-D coordinates, reducer used)``."""
        cfg, n = self.config, len(vectors)
        if n < 3:
            xy = np.zeros((n, 2))
            width = min(2, vectors.shape[1])
            xy[:, :width] = vectors[:, :width]
            return vectors, xy, "none"
        reducer = cfg.reducer
        if reducer == "umap" and n < cfg.min_points_for_umap:
            notes.append(
                f"{n} examples: too few for UMAP (needs {cfg.min_points_for_umap}); "
                "reduced with PCA"
            )
            reducer = "pca"
        if reducer == "umap":
            try:
                return (*self._umap(vectors), "umap")
            except ImportError:
                notes.append(
                    "umap-learn is not installed (pip install 'soft-prompting[analysis]'): "
                    "reduced with PCA instead"
                )
                reducer = "pca"
        plot_xy = _pca(vectors, 2)
        if reducer == "none":
            return vectors, plot_xy, "none"
        return _pca(vectors, cfg.n_components), plot_xy, "pca"

    def _umap(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import umap  # lazy: numba's start-up is paid only here

        cfg, n = self.config, len(vectors)
        common = {
            "n_neighbors": max(2, min(cfg.n_neighbors, n - 1)),
            "min_dist": cfg.min_dist,
            "random_state": cfg.seed,
            "n_jobs": 1,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # UMAP's notes on seeds and n_jobs; we chose both
            reduced = umap.UMAP(n_components=min(cfg.n_components, n - 2), **common).fit_transform(
                vectors
            )
            if reduced.shape[1] == 2:
                return reduced, reduced
            xy = umap.UMAP(n_components=2, **common).fit_transform(vectors)
        return reduced, xy

    def cluster(self, reduced: np.ndarray, notes: list[str]) -> tuple[np.ndarray, str]:
        """A label per row (-1: noise) and the method used."""
        cfg, n = self.config, len(reduced)
        if n < 3:
            notes.append(f"{n} example(s): too few to cluster; all put in cluster 0")
            return np.zeros(n, dtype=int), "none"
        if cfg.method == "hdbscan":
            from sklearn.cluster import HDBSCAN

            size = max(2, min(cfg.min_cluster_size, n // 2))
            labels = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(reduced)
            if (labels < 0).all():
                notes.append(
                    "HDBSCAN found no dense group (all noise): try method=kmeans or a smaller "
                    "min_cluster_size"
                )
            return labels.astype(int), "hdbscan"
        from sklearn.cluster import KMeans

        if cfg.n_clusters is not None:
            k = min(cfg.n_clusters, n)
            labels = KMeans(n_clusters=k, n_init=10, random_state=cfg.seed).fit_predict(reduced)
            return labels.astype(int), "kmeans"
        best, best_score = np.zeros(n, dtype=int), -math.inf
        for k in range(2, min(8, n - 1) + 1):
            labels = KMeans(n_clusters=k, n_init=10, random_state=cfg.seed).fit_predict(reduced)
            score = silhouette(reduced, labels)
            if score is not None and score > best_score:
                best, best_score = labels, score
        return best.astype(int), "kmeans"

    # ------------------------------------------------------------------ descriptions
    def describe_clusters(
        self, records: list[dict], labels: np.ndarray, reduced: np.ndarray
    ) -> list[dict]:
        """Size, metrics, categories, distinguishing words and typical examples of each cluster."""
        cfg = self.config
        columns = {name: metric_values(records, fn) for name, fn in self.metrics.items()}
        words = [Counter(_words(r)) for r in records]
        overall = sum(words, Counter())
        total = max(1, sum(overall.values()))
        clusters = []
        ids = sorted({int(x) for x in labels}, key=lambda x: (x < 0, x))
        for cluster_id in ids:
            members = np.flatnonzero(labels == cluster_id)
            inside = sum((words[i] for i in members), Counter())
            size_words = max(1, sum(inside.values()))
            scores = {
                w: (c / size_words) * math.log((c / size_words) / (overall[w] / total))
                for w, c in inside.items()
                if c >= min(2, len(members))
            }
            top = sorted((w for w in scores if scores[w] > 0), key=lambda w: (-scores[w], w))
            top = top[: cfg.top_words]
            if cluster_id >= 0:
                centre = reduced[members].mean(0)
                order = members[np.argsort(((reduced[members] - centre) ** 2).sum(1))]
            else:
                kl = columns.get("kl_divergence", np.zeros(len(records)))
                order = members[np.argsort(-np.nan_to_num(kl[members], nan=-np.inf))]
            clusters.append(
                {
                    "cluster": cluster_id,
                    "size": int(len(members)),
                    "share": float(len(members) / max(1, len(records))),
                    "metrics": {
                        name: describe(values[members]) for name, values in columns.items()
                    },
                    "categories": dict(Counter(str(records[i].get("category")) for i in members)),
                    "sources": dict(Counter(str(records[i].get("source")) for i in members)),
                    "distinguishing_words": top,
                    "examples": [
                        _example(records[i], int(i)) for i in order[: cfg.examples_per_cluster]
                    ],
                }
            )
        return clusters

    def write(self, records: list[dict], result: dict, xy: np.ndarray, labels: np.ndarray) -> dict:
        from soft_prompting.analysis import plots

        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                "index": i,
                "cluster": int(labels[i]),
                "x": float(xy[i, 0]),
                "y": float(xy[i, 1]),
                "category": record.get("category"),
                "source": record.get("source"),
                "kl_divergence": record.get("metrics", {}).get("kl_divergence"),
                "prompt": record.get("prompt"),
            }
            for i, record in enumerate(records)
        ]
        files = {"assignments": str(write_jsonl(out / "clusters.jsonl", rows))}
        kl = np.asarray(
            [np.nan if r["kl_divergence"] is None else r["kl_divergence"] for r in rows]
        )
        plot = plots.cluster_plot(xy, labels, kl, out / "clusters.png", result["reducer"].upper())
        if plot is not None:
            files["plot"] = str(plot)
        summary = {k: v for k, v in result.items() if k not in ("assignments", "coordinates")}
        files["summary"] = str(out / "clusters_summary.json")
        write_json(out / "clusters_summary.json", summary | {"files": files})
        return files


def word_diff(text_1, text_2) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """Each text as ``(word, differs)`` pairs, from a word-level diff of the two."""
    words_1, words_2 = str(text_1 or "").split(), str(text_2 or "").split()
    marked_1, marked_2 = [], []
    matcher = difflib.SequenceMatcher(a=words_1, b=words_2, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        marked_1 += [(w, op != "equal") for w in words_1[i1:i2]]
        marked_2 += [(w, op != "equal") for w in words_2[j1:j2]]
    return marked_1, marked_2


def first_disagreement(text_1, text_2, max_words: int = SPAN_WORDS) -> tuple[str, str]:
    """The first span where two continuations differ, as ``(model_1's words, model_2's words)``.

    Word-level diff; each side keeps at most ``max_words`` words, so "12 . question : what is"
    against "11 . question : who" gives ``("12", "11")``. ``("", "")`` when the texts agree; one
    side is empty when the other only adds words there.
    """
    words_1, words_2 = str(text_1 or "").split(), str(text_2 or "").split()
    matcher = difflib.SequenceMatcher(a=words_1, b=words_2, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op != "equal":
            return " ".join(words_1[i1:i2][:max_words]), " ".join(words_2[j1:j2][:max_words])
    return "", ""


def normalise_span(span: str) -> str:
    """A span with every number folded into ``#num``: the behaviour, not the value."""
    return " ".join("#num" if NUMBER.match(w) else w for w in span.split())


def disagreement_features(records: list[dict]) -> np.ndarray:
    """``[N, D]`` TF-IDF of each record's first disagreeing span, one unit block per model.

    Records whose continuations agree get a zero row (they group together: no difference).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    spans = [first_disagreement(r.get("generation_1"), r.get("generation_2")) for r in records]
    blocks = []
    for side in (0, 1):
        texts = [normalise_span(s[side]) for s in spans]
        vectorizer = TfidfVectorizer(token_pattern=r"#num|[^\s]+", lowercase=True)
        try:
            blocks.append(vectorizer.fit_transform(texts).toarray())
        except ValueError:  # every span of this side empty: no vocabulary
            blocks.append(np.zeros((len(records), 1)))
    return np.concatenate([_unit_rows(b) for b in blocks], axis=1)


def purity(labels, truth) -> float:
    """Share of examples whose cluster's majority label is their own (noise counts as one group).

    1.0 when no cluster mixes two ``truth`` labels; splitting a label over clusters is not
    penalised, so read it beside the number of clusters.
    """
    labels, truth = np.asarray(labels), np.asarray(truth)
    if len(labels) == 0:
        return float("nan")
    majority = sum(Counter(truth[labels == c].tolist()).most_common(1)[0][1] for c in set(labels))
    return float(majority / len(labels))


def silhouette(reduced: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette of the non-noise points (None when it is undefined)."""
    keep = labels >= 0
    if len({int(x) for x in labels[keep]}) < 2 or keep.sum() - 1 < 2:
        return None
    if len({int(x) for x in labels[keep]}) >= keep.sum():
        return None
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(reduced[keep], labels[keep]))


def _pca(vectors: np.ndarray, dims: int) -> np.ndarray:
    centred = vectors - vectors.mean(0)
    dims = min(dims, *centred.shape)
    if dims == 0:
        return np.zeros((len(vectors), 2))
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    out = u[:, :dims] * s[:dims]
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out


def _unit_rows(block: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.where(norms > 0, norms, 1)


def _words(record: dict) -> list[str]:
    text = " ".join(str(record.get(k, "")) for k in ("prompt", "generation_1", "generation_2"))
    return WORD.findall(text.lower())


def _example(record: dict, index: int) -> dict:
    return {
        "index": index,
        "prompt": record.get("prompt"),
        "generation_1": record.get("generation_1"),
        "generation_2": record.get("generation_2"),
        "category": record.get("category"),
        "kl_divergence": record.get("metrics", {}).get("kl_divergence"),
    }
