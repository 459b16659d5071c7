"""Shared fixtures: tiny random model pairs written with save_pretrained (no hub, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Re-exported: tests import these from conftest as well as from helpers.
from helpers import (  # noqa: F401
    WORDS,
    make_model,
    make_tokenizer,
    run_entrypoint,
    save_pair_member,
    train_tiny_pair,
)

# Tests never reach a hub; an accidental hub id fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory) -> tuple[str, str]:
    """Two different random tiny Llamas sharing one tokenizer, as local save_pretrained folders."""
    root = tmp_path_factory.mktemp("tiny_pair")
    return (
        str(save_pair_member(root / "model_1", seed=1)),
        str(save_pair_member(root / "model_2", seed=2)),
    )


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A user text folder with two categories, one .txt and one .jsonl."""
    import json

    folder = tmp_path_factory.mktemp("texts")
    animals = [f"the {a} sat on the mat and {b}" for a in ("cat", "dog") for b in WORDS[:20]]
    (folder / "animals.txt").write_text("\n".join(animals) + "\n")
    persona = [f"i am a helpful assistant i like to read {w}" for w in WORDS[10:40]]
    (folder / "persona.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in persona))
    return folder


@pytest.fixture(scope="session")
def organism_dirs() -> dict[str, Path]:
    """Every model organism's folder, built into the cache on first use (minutes on a cold
    cache, once a session); only ``slow`` tests may ask for it."""
    from soft_prompting.organisms.builder import ORGANISMS, organism_path

    return {name: organism_path(name) for name in ORGANISMS}


@pytest.fixture(scope="session")
def organism_tokenizer():
    """The byte-level BPE tokenizer every organism shares, without building a model: read from
    the cache when base is built, else trained by the builder's own code on base's documents
    (seconds; the same files byte for byte)."""
    from transformers import PreTrainedTokenizerFast

    from soft_prompting.organisms import builder
    from soft_prompting.organisms.corpus import corpus_documents

    built = builder.cache_dir() / "organisms" / f"base-{builder.recipe_hash('base')}"
    if built.is_dir():
        return PreTrainedTokenizerFast.from_pretrained(built)
    training = builder.BASE_TRAINING
    return builder._train_tokenizer(
        corpus_documents("base", training.n_documents, training.data_seed)
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip on machines without CUDA instead of failing; a test that asks
    for the organisms must be marked ``slow`` (``-m "not slow"`` builds none)."""
    unmarked = [
        item.nodeid
        for item in items
        if "organism_dirs" in getattr(item, "fixturenames", ()) and "slow" not in item.keywords
    ]
    if unmarked:
        raise pytest.UsageError(f"tests using organism_dirs must be marked slow: {unmarked}")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
