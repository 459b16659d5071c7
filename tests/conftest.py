"""Shared fixtures: tiny random model pairs written with save_pretrained (no hub, no network)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
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

# The organisms' build started by pytest_collection_modifyitems, and the file it writes to.
BACKGROUND_BUILD = pytest.StashKey[tuple[subprocess.Popen, Path]]()


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
def organism_dirs(pytestconfig) -> dict[str, Path]:
    """Every model organism's folder, built into the cache once a session (minutes on a cold
    cache: the build starts in the background when the session starts, see
    :func:`pytest_collection_modifyitems`); only ``slow`` tests may ask for it."""
    from soft_prompting.organisms.builder import ORGANISMS, organism_path

    if BACKGROUND_BUILD in pytestconfig.stash:
        build, log = pytestconfig.stash[BACKGROUND_BUILD]
        if build.wait() != 0:
            pytest.fail(f"building the organisms failed:\n{log.read_text()[-3000:]}")
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


def uses_organisms(item: pytest.Item) -> bool:
    return "organism_dirs" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after ``-m``/``-k`` deselection: the items that will run
def pytest_collection_modifyitems(config, items):
    """A test that asks for the organisms must be marked ``slow`` (``-m "not slow"`` builds
    none); tests marked ``gpu`` skip on machines without CUDA instead of failing.

    On a cold cache the organisms take minutes to build: the build starts now, in a process of
    its own, and the test files that use them run last (each file kept whole, so its module
    fixtures are set up once) while the other tests run on the other core.
    """
    unmarked = [
        item.nodeid for item in items if uses_organisms(item) and "slow" not in item.keywords
    ]
    if unmarked:
        raise pytest.UsageError(f"tests using organism_dirs must be marked slow: {unmarked}")
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)

    from soft_prompting.organisms.builder import ORGANISMS, cache_dir, recipe_hash

    modules_with_organisms = {item.path for item in items if uses_organisms(item)}
    if not modules_with_organisms:
        return
    items.sort(key=lambda item: item.path in modules_with_organisms)  # stable: order kept
    built = cache_dir() / "organisms"
    if config.option.collectonly or all(
        (built / f"{name}-{recipe_hash(name)}").is_dir() for name in ORGANISMS
    ):
        return
    log = Path(tempfile.mkstemp(prefix="soft_prompting-organisms-", suffix=".log")[1])
    with log.open("w") as handle:
        build = subprocess.Popen(
            [sys.executable, "-m", "soft_prompting.organisms"], stdout=handle, stderr=handle
        )
    config.stash[BACKGROUND_BUILD] = (build, log)


def pytest_unconfigure(config):
    """A session that stops early stops the build too (interrupted, a build leaves nothing);
    the build's log stays only when it failed."""
    if BACKGROUND_BUILD in config.stash:
        build, log = config.stash[BACKGROUND_BUILD]
        stopped = build.poll() is None
        if stopped:
            build.send_signal(signal.SIGINT)
            build.wait()
        if stopped or build.returncode == 0:
            log.unlink(missing_ok=True)
