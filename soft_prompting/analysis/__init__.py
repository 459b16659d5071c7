"""Analysis of a divergent dataset: where and how the pair parts ways, and which behaviours cluster.

    from soft_prompting.analysis import DivergenceAnalyzer, BehavioralClusteringAnalyzer

Reads run-directory files only (records, summaries, logs); it imports no training code. The
analyzers are imported on first use, so ``import soft_prompting.analysis`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DivergenceAnalyzer": "soft_prompting.analysis.patterns",
    "BehavioralClusteringAnalyzer": "soft_prompting.analysis.clustering",
    "ClusteringConfig": "soft_prompting.analysis.clustering",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
