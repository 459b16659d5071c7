"""The divergent dataset: candidate prompts, scored without the soft prompt, sorted by divergence,
written as ``divergent_dataset.jsonl`` and ``divergent_dataset.pt`` (the same records, plain types,
loadable with ``torch.load(path, weights_only=True)``).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from soft_prompting.artifacts import write_jsonl, write_torch
from soft_prompting.generation import SamplingSettings, score_prompts
from soft_prompting.models import ModelPair

JSONL_NAME = "divergent_dataset.jsonl"
PT_NAME = "divergent_dataset.pt"


def balanced_prompts(
    texts_by_category: dict[str, list[str]], num_prompts: int, seed: int
) -> list[tuple[str, str]]:
    """Up to ``num_prompts`` ``(category, text)`` pairs, taken round-robin over the categories."""
    rng = random.Random(seed)
    shuffled = {}
    for category, texts in sorted(texts_by_category.items()):
        texts = list(texts)
        rng.shuffle(texts)
        shuffled[category] = texts
    picked = []
    for row in itertools.zip_longest(*shuffled.values()):
        for category, text in zip(shuffled, row, strict=True):
            if text is not None and len(picked) < num_prompts:
                picked.append((category, text))
    return picked


def build_divergent_dataset(
    pair: ModelPair,
    candidates: list[tuple[str, str]],
    settings: SamplingSettings,
    provenance: dict,
    source: str = "category_text",
    seed: int = 0,
) -> list[dict]:
    """Score ``(category, prompt)`` candidates without soft prompt; records sorted by KL, highest first.

    Args:
        pair: the frozen model pair.
        candidates: ``(category, prompt)`` pairs.
        settings: sampling settings of the continuations.
        provenance: what makes each record self-describing (model ids, checkpoint, seed), copied
            into every record.
        source: the strategy that proposed the candidates.
        seed: sampling seed.
    """
    prompts = [prompt for _, prompt in candidates]
    records = score_prompts(pair, prompts, settings, seed=seed)
    for record, (category, _) in zip(records, candidates, strict=True):
        record["category"] = category
        record["source"] = source
        record["generation_params"] = {
            "max_length": settings.max_length,
            "num_generations_per_prompt": settings.num_generations_per_prompt,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
        }
        record["provenance"] = dict(provenance)
    return sorted(records, key=lambda r: r["metrics"]["kl_divergence"], reverse=True)


def write_divergent_dataset(records: list[dict], run_dir: str | Path) -> tuple[Path, Path]:
    """Write the records (already sorted) as JSONL and as a plain-types ``.pt``, atomically."""
    run_dir = Path(run_dir)
    return (
        write_jsonl(run_dir / JSONL_NAME, records),
        write_torch(run_dir / PT_NAME, records),
    )
