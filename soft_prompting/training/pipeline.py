"""The steps every entrypoint shares: train, evaluate, compare and the Python façade build their
trainer, datamodule, sampling settings and provenance here, and finish a fit the same way.

Nothing here decides *what* to run; the recipes (``soft_prompting.train``,
``soft_prompting.training.facade``) call these steps in order.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

from soft_prompting import run_files
from soft_prompting.config import DataConfig, TrainConfig, plain
from soft_prompting.data.datamodule import CategoryTextDataModule
from soft_prompting.errors import ConfigError, Interrupted, RunDirError
from soft_prompting.hard_prompts.dataset import (
    fit_prompts_to_context,
    generate_divergent_dataset,
    truncate_texts,
)
from soft_prompting.hard_prompts.sampling import SamplingSettings
from soft_prompting.hard_prompts.strategies import build_strategies
from soft_prompting.pair.placement import lightning_precision, resolve_device
from soft_prompting.tracking import build_loggers
from soft_prompting.training.module import DivergenceModule, check_same_pair

log = logging.getLogger(__name__)


def module_args(config: TrainConfig) -> dict:
    """The module's plain hyperparameters (what its checkpoint saves): the config's Enums become
    their strings, so a checkpoint loads with ``weights_only=True`` and without this package.
    Also where the pair is loaded (``pair_device``, not saved): on the device the trainer runs."""
    pair, t = vars(config.model_pair), config.training
    return plain({k: v for k, v in pair.items() if k != "description"}) | {
        "pair_device": str(pair_device(config)),
        "seed": config.seed,
        "num_soft_prompt_tokens": t.num_soft_prompt_tokens,
        "learning_rate": t.learning_rate,
        "divergence": plain(t.divergence),
        "init": plain(t.init),
        "init_text": t.init_text,
        "norm_constraint": t.norm_constraint,
        "weight_decay": t.weight_decay,
        "gradient_checkpointing": t.gradient_checkpointing,
        "compile": t.compile,
        "on_policy_weight": t.on_policy_weight,
        "on_policy_tokens": t.on_policy_tokens,
        "num_prompts": t.num_prompts,
        "diversity_weight": t.diversity_weight,
    }


def build_datamodule(module: DivergenceModule, config: TrainConfig) -> CategoryTextDataModule:
    """The category texts of ``config.data``, cut to fit the models' context after the prompt.

    Also checks, before any training, that ``generation.max_length`` leaves the dataset's prompts
    room in that context (it would otherwise fail only after training).
    """
    fit_prompts_to_context(module.pair, [], config.generation.max_length)
    return _text_datamodule(module, config.data, config.seed, batch_size=config.training.batch_size)


def _text_datamodule(
    module: DivergenceModule, data: DataConfig, seed: int, **settings
) -> CategoryTextDataModule:
    max_length = fit_to_context(data.max_length, module.max_text_length)
    return CategoryTextDataModule(
        module.tokenizer, **vars(data) | {"max_length": max_length, "seed": seed} | settings
    )


def strategy_texts(module: DivergenceModule, data: DataConfig, seed: int) -> dict[str, list[str]]:
    """:func:`all_texts_by_category` of the datamodule a train run with ``data`` and ``seed``
    builds, without the run: what evaluate's baselines start from (a baseline is
    selection-matched only if it starts where the run's strategies did)."""
    return all_texts_by_category(_text_datamodule(module, data, seed))


def build_trainer(
    config: TrainConfig,
    run_dir: Path,
    resume_step: int | None = None,
    preemption: Preemption | None = None,
    **overrides,
) -> pl.Trainer:
    """The Lightning trainer of ``config.training``, logging and checkpointing into ``run_dir``.

    Args:
        resume_step: the step of the checkpoint the fit resumes (the curve before it is kept).
        preemption: saves a checkpoint when a signal stops the fit (see :class:`Preemption`).
        overrides: replace any ``pl.Trainer`` argument (the Python API uses this for its data).
    """
    arguments = dict(
        max_epochs=config.training.num_epochs,
        max_steps=config.training.max_steps,
        precision=precision(config),
        gradient_clip_val=config.training.gradient_clip_val or None,
        accumulate_grad_batches=config.training.accumulate_grad_batches,
        val_check_interval=config.training.val_check_interval,
        log_every_n_steps=config.training.log_every_n_steps,
        **lightning_devices(config.training.accelerator, config.training.devices),
        num_nodes=config.training.num_nodes,
        strategy=config.training.strategy,
        use_distributed_sampler=False,  # the datamodule's batch sampler shards across ranks itself
        default_root_dir=str(run_dir),
        logger=build_loggers(
            config.wandb,
            run_dir,
            config.name,
            OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True),
            resume_step,
        ),
        callbacks=[
            ModelCheckpoint(
                dirpath=run_dir / run_files.CHECKPOINTS,
                save_last=True,
                every_n_train_steps=config.training.checkpoint_every_n_steps,
            ),
            *([preemption] if preemption is not None else []),
        ],
        plugins=[AtomicCheckpointIO()],
    )
    arguments |= overrides
    arguments["strategy"] = resolve_strategy(arguments["strategy"])
    return pl.Trainer(**arguments)


def lightning_devices(accelerator: str, devices: int) -> dict:
    """``pl.Trainer``'s ``accelerator`` and ``devices`` for ``training.accelerator`` and
    ``training.devices``: Lightning does not take ``cuda:N``, so it becomes ``cuda`` on ``[N]``."""
    kind, _, index = str(accelerator).strip().lower().partition(":")
    if not index:
        return {"accelerator": accelerator, "devices": devices}
    resolve_device(accelerator)  # one line for a malformed name or a machine without CUDA
    if devices != 1:
        raise ConfigError(
            f"training.accelerator={accelerator} names one GPU but training.devices={devices}: "
            f"use training.accelerator=cuda training.devices={devices}, or training.devices=1"
        )
    if int(index) >= torch.cuda.device_count():
        raise ConfigError(
            f"training.accelerator={accelerator} but this machine has "
            f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0: pick one of them"
        )
    return {"accelerator": "cuda", "devices": [int(index)]}


def fit_to_context(max_length: int, context: int | None) -> int:
    """``data.max_length``, lowered (once, with a warning) to what fits in the models' context."""
    if context is None or max_length <= context:
        return max_length
    if context < 2:
        raise ConfigError(
            f"the models' context leaves {context} text tokens after the soft prompt: lower "
            "training.num_soft_prompt_tokens"
        )
    log.warning(
        "data.max_length=%d exceeds the models' context after the soft prompt; using %d",
        max_length,
        context,
    )
    return context


def resolve_strategy(name):
    """``fsdp`` is Lightning's model-parallel strategy, under which the module shards the pair's
    decoder layers itself (FSDP2); the checkpoint stays one small file. Other names pass through."""
    if name != "fsdp":
        return name
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
        from torch.distributed.fsdp import fully_shard  # noqa: F401 (FSDP2)
    except ImportError as err:
        raise ConfigError(
            f"training.strategy=fsdp needs Lightning >= 2.4 and PyTorch >= 2.6 (FSDP2): {err}; "
            "upgrade them, or use training.strategy=ddp or model_pair.device_map=split"
        ) from err

    return ModelParallelStrategy(save_distributed_checkpoint=False)


def pair_device(config: TrainConfig) -> torch.device:
    """Where the frozen pair of this run lives (``training.accelerator``, ``strategy``,
    ``devices``): see :func:`~soft_prompting.pair.placement.resolve_device`."""
    t = config.training
    return resolve_device(t.accelerator, t.strategy, t.devices)


def precision(config: TrainConfig) -> str:
    """Lightning's precision for ``training.mixed_precision`` on the run's device: ``auto`` is
    bf16 autocast where the hardware has bf16 (see :func:`~soft_prompting.pair.placement.autocast_dtype`)."""
    device = resolve_device(config.training.accelerator)
    return lightning_precision(config.training.mixed_precision, device)


def check_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to overwrite finished results unless asked to (resuming is not overwriting)."""
    results = [run_dir / run_files.CHECKPOINTS, run_dir / run_files.DATASET_JSONL]
    if config.ckpt_path is None and not config.overwrite and any(p.exists() for p in results):
        raise RunDirError(
            f"{run_dir} already holds results: resume with ckpt_path=last, pass overwrite=true, "
            "or choose another hydra.run.dir"
        )


@contextmanager
def claimed_run_dir(run_dir: Path, config: TrainConfig):
    """Hold the run directory's lock (one run per folder) and check it may be written.

    Only the first process of a data-parallel run takes the lock: the other ranks share it.
    """
    if not _first_process():
        yield
        return
    with run_files.run_dir_lock(run_dir):
        check_run_dir(run_dir, config)
        yield


def _first_process() -> bool:
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") in ("", "0") for name in ranks)


def check_data(config: TrainConfig) -> None:
    """The data source exists and offers the categories asked for, and the dataset's strategies
    can be built: checked before any model loads (the texts themselves are read once the
    tokenizer is there), not after training."""
    from soft_prompting.data.datamodule import available_categories

    if config.write_dataset:
        build_strategies(config.generation.strategies)

    known = available_categories(config.data.text_dir, config.data.hf_dataset)
    unknown = [c for c in config.data.categories or [] if known is not None and c not in known]
    if unknown:
        raise ConfigError(
            f"data.categories={unknown} not found (available: {known}): fix data.categories or "
            "data.text_dir"
        )


def resume_checkpoint(config: TrainConfig, run_dir: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint ``ckpt_path`` names, read safely and checked against this run's pair and
    prompt length before any model is loaded; ``(None, None)`` for a fresh run.

    ``ckpt_path=last`` with no checkpoint yet starts fresh (a job script may always pass it).
    """
    if config.ckpt_path is None:
        return None, None
    path = Path(config.ckpt_path)
    if config.ckpt_path == "last":
        path = run_dir / run_files.LAST_CHECKPOINT
        if not path.is_file():
            print(f"ckpt_path=last: {path} does not exist yet, so training starts fresh")
            return None, None
    state = run_files.read_checkpoint(path)
    check_same_pair(state.get("hyper_parameters") or {}, module_args(config), f"checkpoint {path}")
    saved = state["state_dict"]["soft_prompt"]  # [P, H], or [K, P, H] for K prompts
    saved_tokens, saved_prompts = saved.shape[-2], (saved.shape[0] if saved.ndim == 3 else 1)
    if saved_tokens != config.training.num_soft_prompt_tokens:
        raise RunDirError(
            f"checkpoint {path} holds a soft prompt of {saved_tokens} virtual tokens: resume with "
            f"training.num_soft_prompt_tokens={saved_tokens}, or drop ckpt_path to start fresh"
        )
    if saved_prompts != config.training.num_prompts:
        raise RunDirError(
            f"checkpoint {path} holds {saved_prompts} soft prompt(s): resume with "
            f"training.num_prompts={saved_prompts}, or drop ckpt_path to start fresh"
        )
    return path, state


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed (a full disk or a kill never leaves a
    truncated ``.ckpt``), and read back with ``weights_only=True`` (nothing is unpickled)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with run_files.atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return run_files.read_checkpoint(path)


class Preemption(Callback):
    """SIGTERM, SIGINT and SLURM's SIGUSR1 stop a run with a checkpoint and a non-zero exit.

    Used as a context around the whole run: during the fit a signal is noted and acted on at the
    end of the current batch (``last.ckpt`` saved, then :class:`Interrupted`); outside the fit it
    raises :class:`Interrupted` at once (every file is written atomically or appended, so nothing
    is torn). Lightning's own SIGTERM handling would exit with status 0, which schedulers read as
    success.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(
        self, run_dir: Path, resume: str = "run the same command with ckpt_path=last"
    ) -> None:
        """``resume`` says how to go on (the Python API: call ``train(ckpt_path="last")``)."""
        self.run_dir, self.resume = Path(run_dir), resume
        self.received: signal.Signals | None = None
        self._fitting = False
        self._previous: dict = {}

    def __enter__(self) -> Preemption:
        self._install()
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _install(self) -> None:
        if not _main_thread():
            return
        for signum in self.SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum)
        if not self._fitting:
            raise Interrupted(
                f"stopped by {self.received.name}; {self.resume} to resume (the checkpoint and "
                "the partial dataset are kept)"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installs its SIGTERM handler when the fit starts: take the signals back.
        self._fitting = True
        self._install()

    def on_train_end(self, trainer, pl_module) -> None:
        self._fitting = False

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._fitting = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        path = self.run_dir / run_files.LAST_CHECKPOINT
        trainer.save_checkpoint(path)
        name = self.received.name if self.received is not None else "a signal on another rank"
        self._fitting = False
        raise Interrupted(
            f"stopped by {name} at step {trainer.global_step}: {path} saved; {self.resume} to "
            "resume"
        )


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def save_last_checkpoint(trainer: pl.Trainer, run_dir: Path) -> None:
    """``last.ckpt`` must be the finished prompt: step-based checkpoints can miss the final steps."""
    trainer.save_checkpoint(run_dir / run_files.LAST_CHECKPOINT)


def export_results(
    trainer: pl.Trainer, module: DivergenceModule, run_dir: Path, metrics: dict
) -> None:
    """On rank 0: the prompt as a PEFT adapter, and ``metrics.json`` with the environment."""
    if trainer.is_global_zero:
        module.save_soft_prompt(run_dir / run_files.SOFT_PROMPT)
        run_files.write_json(
            run_dir / run_files.METRICS,
            metrics | {"environment": run_files.environment(trainer.strategy.root_device)},
        )


def provenance(config: TrainConfig, checkpoint: Path | None) -> dict:
    """What makes each record self-describing: model ids, soft-prompt checkpoint, seed."""
    return {
        "model_1_name": config.model_pair.model_1_name,
        "model_2_name": config.model_pair.model_2_name,
        "soft_prompt_checkpoint": None if checkpoint is None else str(checkpoint),
        "seed": config.seed,
    }


def write_dataset(
    module: DivergenceModule,
    texts: dict[str, list[str]],
    config: TrainConfig,
    run_dir: Path,
    checkpoint: Path | None,
    candidates: list[dict] | None = None,
    num_prompts: int | None = None,
) -> list[dict]:
    """Propose hard prompts with ``generation.strategies`` from ``texts`` (or score the given
    ``candidates``), score them without the soft prompt and write the divergent dataset (resumable:
    see :func:`~soft_prompting.hard_prompts.dataset.generate_divergent_dataset`)."""
    gen = config.generation
    return generate_divergent_dataset(
        module,
        texts,
        build_strategies(gen.strategies),
        SamplingSettings.from_config(gen),
        provenance(config, checkpoint),
        run_dir,
        num_prompts or gen.num_prompts,
        config.seed,
        candidates=candidates,
        max_text_tokens=fit_to_context(config.data.max_length, module.max_text_length),
        overwrite=config.overwrite,
        max_prompt_nll_ratio=gen.max_prompt_nll_ratio,
        localise_top=gen.localise_top,
        rounds=gen.rounds,
    )


def all_texts_by_category(datamodule: CategoryTextDataModule) -> dict[str, list[str]]:
    """Training and held-out texts together, per category, each cut to the training text length
    (``datamodule.max_length``): the hard-prompt strategies' starting points."""
    datamodule.setup("fit")
    texts = datamodule.texts_by_category("train")
    for category, held_out in datamodule.texts_by_category("val").items():
        texts.setdefault(category, []).extend(held_out)
    return truncate_texts(datamodule.tokenizer, texts, datamodule.max_length)
