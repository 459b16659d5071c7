"""The steps every entrypoint shares: train, evaluate, compare and the Python façade build their
trainer, datamodule, sampling settings and provenance here, and finish a fit the same way.

Nothing here decides *what* to run; the recipes (``soft_prompting.train``,
``soft_prompting.training.facade``) call these steps in order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from soft_prompting import run_files
from soft_prompting.config import TrainConfig, plain
from soft_prompting.data.datamodule import CategoryTextDataModule
from soft_prompting.errors import ConfigError, RunDirError
from soft_prompting.hard_prompts.dataset import generate_divergent_dataset
from soft_prompting.hard_prompts.sampling import SamplingSettings
from soft_prompting.hard_prompts.strategies import build_strategies
from soft_prompting.tracking import build_loggers
from soft_prompting.training.module import DivergenceModule

log = logging.getLogger(__name__)


def module_args(config: TrainConfig) -> dict:
    """The module's plain hyperparameters (what its checkpoint saves): the config's Enums become
    their strings, so a checkpoint loads with ``weights_only=True`` and without this package."""
    pair, t = vars(config.model_pair), config.training
    return plain({k: v for k, v in pair.items() if k != "description"}) | {
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
    }


def build_datamodule(module: DivergenceModule, config: TrainConfig) -> CategoryTextDataModule:
    """The category texts of ``config.data``, cut to fit the models' context after the prompt."""
    return CategoryTextDataModule(
        module.tokenizer,
        **vars(config.data)
        | {
            "max_length": fit_to_context(config.data.max_length, module.max_text_length),
            "batch_size": config.training.batch_size,
            "seed": config.seed,
        },
    )


def build_trainer(config: TrainConfig, run_dir: Path, **overrides) -> pl.Trainer:
    """The Lightning trainer of ``config.training``, logging and checkpointing into ``run_dir``.

    ``overrides`` replace any ``pl.Trainer`` argument (the Python API uses this for its own data).
    """
    arguments = dict(
        max_epochs=config.training.num_epochs,
        max_steps=config.training.max_steps,
        precision=precision(config),
        gradient_clip_val=config.training.gradient_clip_val or None,
        accumulate_grad_batches=config.training.accumulate_grad_batches,
        val_check_interval=config.training.val_check_interval,
        log_every_n_steps=config.training.log_every_n_steps,
        accelerator=config.training.accelerator,
        devices=config.training.devices,
        num_nodes=config.training.num_nodes,
        strategy=config.training.strategy,
        use_distributed_sampler=False,  # the datamodule's batch sampler shards across ranks itself
        default_root_dir=str(run_dir),
        logger=build_loggers(
            config.wandb,
            run_dir,
            config.name,
            OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True),
        ),
        callbacks=[
            ModelCheckpoint(
                dirpath=run_dir / run_files.CHECKPOINTS,
                save_last=True,
                every_n_train_steps=config.training.checkpoint_every_n_steps,
            )
        ],
    )
    arguments |= overrides
    arguments["strategy"] = resolve_strategy(arguments["strategy"])
    return pl.Trainer(**arguments)


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


def precision(config: TrainConfig) -> str:
    if not config.training.mixed_precision:
        return "32-true"
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "16-mixed"
    return "bf16-mixed"


def check_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to overwrite finished results unless asked to (resuming is not overwriting)."""
    results = [run_dir / run_files.CHECKPOINTS, run_dir / run_files.DATASET_JSONL]
    if config.ckpt_path is None and not config.overwrite and any(p.exists() for p in results):
        raise RunDirError(
            f"{run_dir} already holds results: resume with ckpt_path=last, pass overwrite=true, "
            "or choose another hydra.run.dir"
        )


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
    )


def all_texts_by_category(datamodule: CategoryTextDataModule) -> dict[str, list[str]]:
    """Training and held-out texts together, per category: the strategies' starting points."""
    datamodule.setup("fit")
    texts = datamodule.texts_by_category("train")
    for category, held_out in datamodule.texts_by_category("val").items():
        texts.setdefault(category, []).extend(held_out)
    return texts
