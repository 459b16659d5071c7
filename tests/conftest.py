"""Shared fixtures: tiny random model pairs written with save_pretrained (no hub, no network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach a hub; an accidental hub id fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a cat dog sat on mat question answer what is plus minus one two three four five six "
    "seven eight nine ten i am helpful assistant like to read books stealing wrong because it "
    "hurts others can write poems water gold oxygen symbol for of and"
).split()


def make_tokenizer(extra_words: tuple[str, ...] = ()):
    """A real word-level fast tokenizer (bos/eos/pad/unk) over a small vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(WORDS) + list(extra_words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=128,
    )


def make_model(seed: int, vocab_size: int, hidden_size: int = 32, num_layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def save_pair_member(directory: Path, seed: int, tokenizer=None, hidden_size: int = 32) -> Path:
    tokenizer = tokenizer or make_tokenizer()
    model = make_model(seed, len(tokenizer), hidden_size)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


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
    """Every model organism's folder, built into the default cache on first use (~2 min, once)."""
    from soft_prompting.organisms.builder import ORGANISMS, organism_path

    return {name: organism_path(name) for name in ORGANISMS}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip on machines without CUDA instead of failing."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_entrypoint(
    module: str, args: list[str], cwd: Path, env: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` as a user runs it, offline; ``env`` values of None are unset."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"} | (env or {})
    env = {key: value for key, value in env.items() if value is not None}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def train_tiny_pair(run_dir: Path, pair_dirs, text_dir, *extra: str, accelerator="cpu") -> dict:
    """Three steps of ``python -m soft_prompting.train`` on a tiny pair; what the run left.

    Returns:
        ``prompt`` and ``step`` from ``checkpoints/last.ckpt``, ``metrics`` (metrics.json) and the
        run's ``output`` (stdout and stderr).
    """
    import json

    args = [
        "model_pair=custom",
        f"model_pair.model_1_name={pair_dirs[0]}",
        f"model_pair.model_2_name={pair_dirs[1]}",
        f"data.text_dir={text_dir}",
        "training.num_soft_prompt_tokens=4",
        "training.batch_size=6",  # the global batch: 3 texts per rank with two ranks
        "training.max_steps=3",
        f"training.accelerator={accelerator}",
        "write_dataset=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    result = run_entrypoint("soft_prompting.train", args, run_dir.parent, {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {
        "prompt": state["state_dict"]["soft_prompt"],
        "step": state["global_step"],
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "output": result.stdout + result.stderr,
    }
