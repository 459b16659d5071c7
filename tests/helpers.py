"""Helpers shared by the tests: the tiny word-level tokenizer and Llamas, and running an
entrypoint as a user does. (Fixtures live in conftest.py, which re-exports these.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from soft_prompting.config import to_overrides
from soft_prompting.organisms.tiny import random_llama, word_tokenizer

WORDS = (
    "the a cat dog sat on mat question answer what is plus minus one two three four five six "
    "seven eight nine ten i am helpful assistant like to read books stealing wrong because it "
    "hurts others can write poems water gold oxygen symbol for of and"
).split()


_STRATEGIES = "soft_prompting.hard_prompts.strategies."
SMALL_STRATEGY_LIST = [
    {"_target_": f"{_STRATEGIES}CategoryTextRanking", "texts_per_category": 8, "num_candidates": 8},
    {
        "_target_": f"{_STRATEGIES}SoftPromptExploration",
        "num_seeds": 2,
        "samples_per_seed": 2,
        "max_new_tokens": 6,
        "num_candidates": 4,
    },
    {
        "_target_": f"{_STRATEGIES}ContrastiveExploration",
        "num_seeds": 2,
        "samples_per_seed": 2,
        "max_new_tokens": 6,
        "num_candidates": 4,
    },
    {
        "_target_": f"{_STRATEGIES}ProjectionSearch",
        "num_steps": 2,
        "search_batch": 4,
        "num_restarts": 1,
        "num_candidates": 2,
    },
    {
        "_target_": f"{_STRATEGIES}WhiteBoxPrior",
        "num_tokens": 2,
        "texts_per_token": 4,
        "num_candidates": 4,
    },
]
"""The default strategies, each a few candidates: a run's dataset in seconds, every kind of
proposal still exercised (the defaults spend most of a tiny run proposing)."""
SMALL_STRATEGIES = to_overrides({"generation": {"strategies": SMALL_STRATEGY_LIST}})[0]
""":data:`SMALL_STRATEGY_LIST` as a command-line override."""


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


def spy_static_caches(monkeypatch) -> list[tuple[int, object]]:
    """``(length, cache)`` of every key/value cache the decoders allocate once, as built (None
    where the model or transformers could take none)."""
    import soft_prompting.hard_prompts.sampling as sampling

    built, allocate = [], sampling.static_cache

    def spy(model, length: int):
        built.append((length, allocate(model, length)))
        return built[-1][1]

    monkeypatch.setattr(sampling, "static_cache", spy)
    return built


def contract_args(pair_dirs, text_dir, run_dir: Path) -> list[str]:
    """The contract command's overrides: the pair, the texts and the run directory."""
    return [
        f"model_pair.model_1_name={pair_dirs[0]}",
        f"model_pair.model_2_name={pair_dirs[1]}",
        f"data.text_dir={text_dir}",
        f"hydra.run.dir={run_dir}",
    ]


def fit_briefly(module, texts_by_category: dict, run_dir: Path, max_steps: int, ckpt_path=None):
    """``max_steps`` of a plain Lightning fit of ``module`` on ``texts_by_category`` (batches of
    4, seed 0), ``last.ckpt`` in ``run_dir/checkpoints``; the trainer and its datamodule."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from soft_prompting.data.datamodule import CategoryTextDataModule

    datamodule = CategoryTextDataModule(module.tokenizer, categories=None, batch_size=4, seed=0)
    datamodule.load_categories = lambda: texts_by_category
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True)],
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, datamodule


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


def run_main(
    module: str, args: list[str], cwd: Path, env: dict | None = None
) -> subprocess.CompletedProcess:
    """:func:`run_entrypoint` in this process: ``MODULE.main()`` with ``sys.argv`` set, run in
    ``cwd``, its stdout and stderr captured, and an exception that escapes it printed as the
    interpreter would (a traceback, exit status 1). Seconds faster than a new interpreter.

    Everything the entrypoint changes for the process is put back: the working directory, the
    environment (``env`` values of None are unset; ``OMP_NUM_THREADS`` sets torch's threads),
    ``sys.argv``, the logging handlers Hydra's job logging installs (closed, so the run's log file
    is complete), warning filters, and Hydra's global state. Use :func:`run_entrypoint` for what
    needs a process of its own (a signal from outside, kills, a console script, import side
    effects, DDP).
    """
    import contextlib
    import importlib
    import io
    import logging
    import traceback
    import warnings

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    stdout, stderr = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_threads = torch.get_num_threads()
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]  # fmt: skip
    saved_loggers = {
        logger: (list(logger.handlers), logger.level, logger.propagate, logger.disabled)
        for logger in loggers
    }
    overrides = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"} | (env or {})
    returncode = 0
    try:
        for key, value in overrides.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if overrides.get("OMP_NUM_THREADS"):  # what the variable does to a new process
            torch.set_num_threads(int(overrides["OMP_NUM_THREADS"]))
        sys.argv = [module, *args]
        os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout):
            with contextlib.redirect_stderr(stderr):
                try:
                    importlib.import_module(module).main()
                except SystemExit as exit_:
                    code = exit_.code
                    if isinstance(code, str):
                        print(code, file=sys.stderr)
                    returncode = code if isinstance(code, int) else int(code is not None)
                except KeyboardInterrupt:
                    raise  # the test run's own Ctrl-C
                except BaseException:  # noqa: B036 - an uncaught error ends a real process too
                    traceback.print_exc()
                    returncode = 1
    finally:
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for logger, (handlers, level, propagate, disabled) in saved_loggers.items():
            for handler in logger.handlers:
                if handler not in handlers:
                    handler.close()
            logger.handlers[:] = handlers
            logger.level, logger.propagate, logger.disabled = level, propagate, disabled
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    return subprocess.CompletedProcess(
        [module, *args], returncode, stdout.getvalue(), stderr.getvalue()
    )


def train_tiny_pair(
    run_dir: Path, pair_dirs, text_dir, *extra: str, accelerator="cpu", in_process=False
) -> dict:
    """Three steps of ``python -m soft_prompting.train`` on a tiny pair; what the run left.

    ``in_process`` runs it with :func:`run_main` (a run of one process only: DDP and FSDP launch
    their ranks from the command line of a process of its own).

    Returns:
        ``prompt`` and ``step`` from ``checkpoints/last.ckpt``, ``metrics`` (metrics.json) and the
        run's ``output`` (stdout and stderr).
    """
    import json

    args = [
        "model_pair=custom",
        *contract_args(pair_dirs, text_dir, run_dir),
        "training.num_soft_prompt_tokens=4",
        "training.batch_size=6",  # the global batch: 3 texts per rank with two ranks
        "training.max_steps=3",
        f"training.accelerator={accelerator}",
        # The tests compare prompts across runs (ranks, strategies): fp32 on every machine, since
        # mixed_precision=auto would pick bf16 only on CPUs and GPUs that have it.
        "training.mixed_precision=false",
        "write_dataset=false",
        *extra,
    ]
    run = run_main if in_process else run_entrypoint
    result = run("soft_prompting.train", args, run_dir.parent, {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {
        "prompt": state["state_dict"]["soft_prompt"],
        "step": state["global_step"],
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "output": result.stdout + result.stderr,
    }
