"""Train a soft prompt that maximises the divergence of a model pair, then write the divergent dataset.

    python -m soft_prompting.train model_pair=toy_unlearning training.num_soft_prompt_tokens=16

Leaves in the run directory (``hydra.run.dir``): ``checkpoints/last.ckpt``, ``soft_prompt/`` (a PEFT
prompt-tuning adapter), ``divergent_dataset.jsonl`` and ``.pt``, ``metrics.json`` and ``logs/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from soft_prompting.artifacts import environment, write_json
from soft_prompting.config import TrainConfig, register_configs, to_train_config
from soft_prompting.data import CategoryTextDataModule
from soft_prompting.dataset import generate_divergent_dataset
from soft_prompting.errors import ConfigError, RunDirError, reported_errors
from soft_prompting.generation import SamplingSettings
from soft_prompting.models import ModelPairManager
from soft_prompting.module import DivergenceModule
from soft_prompting.strategies import build_strategies
from soft_prompting.tracking import build_loggers, finish_tracking

log = logging.getLogger(__name__)
register_configs()


def train(config: TrainConfig, run_dir: Path) -> dict[str, float]:
    """The recipe: seed → model pair + prompt → data → trainer → fit → validate → export → dataset."""
    check_run_dir(run_dir, config)
    pl.seed_everything(config.seed, workers=True)
    module = DivergenceModule(**module_args(config))
    datamodule = build_datamodule(module, config)
    trainer = build_trainer(config, run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=config.ckpt_path)
    # Step-based checkpoints can miss the final steps; last.ckpt must be the finished prompt.
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule)[0].items()}
    if trainer.is_global_zero:
        print(
            f"validation divergence ({config.training.divergence}): "
            f"{metrics['val/divergence']:.4f} with the soft prompt, "
            f"{metrics['val/divergence_no_prompt']:.4f} without"
        )
        module.save_soft_prompt(run_dir / "soft_prompt")
        write_json(run_dir / "metrics.json", metrics | {"environment": environment()})
        if config.write_dataset and config.training.strategy == "fsdp":
            print(sharded_dataset_hint(run_dir))
        elif config.write_dataset:
            # Lightning's teardown left the module on the CPU; the pair would follow it there.
            module.to(trainer.strategy.root_device)
            write_dataset(module, datamodule, config, run_dir)
    return metrics


def sharded_dataset_hint(run_dir: Path) -> str:
    """Under FSDP no rank holds the whole pair, and generation would need every rank in lockstep:
    the dataset is written by a second, single-process run that resumes the finished prompt."""
    return (
        "the pair is sharded over the ranks, so the divergent dataset is written by one process "
        "that holds the pair; rerun with the same overrides plus: training.strategy=auto "
        f"training.devices=1 training.num_nodes=1 model_pair.device_map=split ckpt_path=last "
        f"hydra.run.dir={run_dir}"
    )


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
            config.wandb, run_dir, config.name, OmegaConf.to_container(OmegaConf.structured(config))
        ),
        callbacks=[
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                save_last=True,
                every_n_train_steps=config.training.checkpoint_every_n_steps,
            )
        ],
    )
    arguments |= overrides
    arguments["strategy"] = resolve_strategy(arguments["strategy"])
    return pl.Trainer(**arguments)


def module_args(config: TrainConfig) -> dict:
    """The module's plain hyperparameters (what its checkpoint saves)."""
    pair, t = vars(config.model_pair), config.training
    return {k: v for k, v in pair.items() if k != "description"} | {
        "seed": config.seed,
        "num_soft_prompt_tokens": t.num_soft_prompt_tokens,
        "learning_rate": t.learning_rate,
        "divergence": t.divergence,
        "init": t.init,
        "init_text": t.init_text,
        "norm_constraint": t.norm_constraint,
        "weight_decay": t.weight_decay,
        "gradient_checkpointing": t.gradient_checkpointing,
        "compile": t.compile,
        "on_policy_weight": t.on_policy_weight,
        "on_policy_tokens": t.on_policy_tokens,
    }


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
    results = [run_dir / "checkpoints", run_dir / "divergent_dataset.jsonl"]
    if config.ckpt_path is None and not config.overwrite and any(p.exists() for p in results):
        raise RunDirError(
            f"{run_dir} already holds results: resume with ckpt_path=last, pass overwrite=true, "
            "or choose another hydra.run.dir"
        )


def write_dataset(module, datamodule, config: TrainConfig, run_dir: Path) -> None:
    """Propose hard prompts with ``generation.strategies``, score them without the soft prompt and
    write the divergent dataset (resumable: see :func:`~soft_prompting.dataset.generate_divergent_dataset`)."""
    gen = config.generation
    settings = SamplingSettings(
        gen.max_length, gen.num_generations_per_prompt, gen.temperature, gen.top_p, gen.batch_size
    )
    provenance = {
        "model_1_name": config.model_pair.model_1_name,
        "model_2_name": config.model_pair.model_2_name,
        "soft_prompt_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "seed": config.seed,
    }
    records = generate_divergent_dataset(
        module,
        all_texts_by_category(datamodule),
        build_strategies(gen.strategies),
        settings,
        provenance,
        run_dir,
        gen.num_prompts,
        config.seed,
    )
    print(f"divergent dataset: {len(records)} records -> {run_dir / 'divergent_dataset.jsonl'}")


def all_texts_by_category(datamodule: CategoryTextDataModule) -> dict[str, list[str]]:
    """Training and held-out texts together, per category: the strategies' starting points."""
    datamodule.setup("fit")
    texts = datamodule.texts_by_category("train")
    for category, held_out in datamodule.texts_by_category("val").items():
        texts.setdefault(category, []).extend(held_out)
    return texts


def check_sweep_direction(sweeper: DictConfig) -> None:
    """A search must maximise what this entrypoint returns (val/divergence); Optuna minimises
    unless told otherwise, which would hunt for the prompts on which the pair agrees."""
    optuna = str(sweeper.get("_target_", "")).endswith("OptunaSweeper")
    if optuna and "minimize" in str(sweeper.get("direction")):
        raise ConfigError(
            "the Optuna sweeper minimises by default, but the train entrypoint returns "
            "val/divergence, which the search should maximise: add hydra.sweeper.direction=maximize "
            "(or use the preset hparams_search=optuna)"
        )


@hydra.main(version_base=None, config_path="pkg://soft_prompting.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_config = HydraConfig.get()
    with reported_errors():  # a search set up the wrong way round stops the whole sweep
        check_sweep_direction(hydra_config.sweeper)
    try:
        # In a sweep, a failed job is recorded as failed and the others still run.
        with reported_errors(exit_on_error=hydra_config.mode != RunMode.MULTIRUN):
            metrics = train(to_train_config(cfg), Path(hydra_config.runtime.output_dir))
    finally:
        # A sweep runs its jobs one after another in this process: the next job starts its own
        # W&B run and loads its own models, so this job's are freed before it starts.
        finish_tracking()
        ModelPairManager.clear_cache()
    return metrics["val/divergence"]


if __name__ == "__main__":
    main()
