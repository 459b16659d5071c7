"""Train a soft prompt that maximises the divergence of a model pair, then write the divergent dataset.

    python -m soft_prompting.train model_pair=toy_unlearning training.num_soft_prompt_tokens=16

Leaves in the run directory (``hydra.run.dir``): ``checkpoints/last.ckpt``, ``soft_prompt/`` (a PEFT
prompt-tuning adapter), ``divergent_dataset.jsonl`` and ``.pt``, ``metrics.json`` and ``logs/``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from soft_prompting import run_files
from soft_prompting.config import TrainConfig, register_configs, to_train_config
from soft_prompting.errors import ConfigError, exit_2_on_config_errors, reported_errors
from soft_prompting.pair.loading import ModelPairManager
from soft_prompting.tracking import finish_tracking
from soft_prompting.training import pipeline
from soft_prompting.training.module import DivergenceModule

register_configs()


def train(config: TrainConfig, run_dir: Path) -> dict[str, float]:
    """The recipe: seed → model pair + prompt → data → trainer → fit → validate → export → dataset.

    One run per directory (a lock), a checkpoint to resume checked before any model loads, and a
    signal (SIGTERM, SIGINT, SLURM's SIGUSR1) saves ``last.ckpt`` and exits non-zero.
    """
    with pipeline.claimed_run_dir(run_dir, config), pipeline.Preemption(run_dir) as preemption:
        pipeline.check_data(config)
        checkpoint, state = pipeline.resume_checkpoint(config, run_dir)
        pl.seed_everything(config.seed, workers=True)
        module = DivergenceModule(**pipeline.module_args(config))
        datamodule = pipeline.build_datamodule(module, config)
        resume_step = state["global_step"] if state else None
        trainer = pipeline.build_trainer(config, run_dir, resume_step, preemption)
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
        pipeline.save_last_checkpoint(trainer, run_dir)
        metrics = {
            k: float(v) for k, v in trainer.validate(module, datamodule=datamodule)[0].items()
        }
        pipeline.export_results(trainer, module, run_dir, metrics)
        if not trainer.is_global_zero:
            return metrics
        print(
            f"validation divergence ({config.training.divergence}): "
            f"{metrics['val/divergence']:.4f} with the soft prompt, "
            f"{metrics['val/divergence_no_prompt']:.4f} without"
        )
        if config.training.num_prompts > 1:  # val/divergence is then the prompts' mean
            each = [
                metrics[f"val/divergence_prompt_{k}"] for k in range(config.training.num_prompts)
            ]
            print("per prompt: " + ", ".join(f"{value:.4f}" for value in each))
        if config.write_dataset and config.training.strategy == "fsdp":
            print(sharded_dataset_hint(run_dir))
        elif config.write_dataset:
            # Lightning's teardown left the module on the CPU; the pair would follow it there.
            module.to(trainer.strategy.root_device)
            texts = pipeline.all_texts_by_category(datamodule)
            records = pipeline.write_dataset(
                module, texts, config, run_dir, run_dir / run_files.LAST_CHECKPOINT
            )
            print(
                f"divergent dataset: {len(records)} records -> {run_dir / run_files.DATASET_JSONL}"
            )
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


@exit_2_on_config_errors
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
