"""Helpers shared by the tests: the tiny word-level tokenizer and Llamas, and running an
entrypoint as a user does. (Fixtures live in conftest.py, which re-exports these.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from soft_prompting.organisms.tiny import random_llama, word_tokenizer

WORDS = (
    "the a cat dog sat on mat question answer what is plus minus one two three four five six "
    "seven eight nine ten i am helpful assistant like to read books stealing wrong because it "
    "hurts others can write poems water gold oxygen symbol for of and"
).split()


def make_tokenizer(extra_words: tuple[str, ...] = ()):
    """A real word-level fast tokenizer (bos/eos/pad/unk) over ``WORDS`` and ``extra_words``."""
    return word_tokenizer([*WORDS, *extra_words])


def make_model(seed: int, vocab_size: int, hidden_size: int = 32, num_layers: int = 2):
    """A random tiny Llama (the package's builder, shared with the benchmark)."""
    return random_llama(seed, vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers)


def save_pair_member(directory: Path, seed: int, tokenizer=None, hidden_size: int = 32) -> Path:
    tokenizer = tokenizer or make_tokenizer()
    model = make_model(seed, len(tokenizer), hidden_size)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


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
        # The tests compare prompts across runs (ranks, strategies): fp32 on every machine, since
        # mixed_precision=auto would pick bf16 only on CPUs and GPUs that have it.
        "training.mixed_precision=false",
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
