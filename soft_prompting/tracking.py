"""Experiment tracking: Lightning's CSV logger always, Weights & Biases when enabled.

W&B runs offline when no API key is configured (``wandb sync`` uploads them later), so a run never
hangs waiting for a login. Secrets are never written: the config logged is the run's config, which
holds no key.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger

from soft_prompting.config import WandbConfig


def wandb_mode(config: WandbConfig) -> str:
    """The W&B mode to use: the configured one, else online only when a key is available."""
    if config.mode:
        if config.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb.mode={config.mode!r}: use online, offline or disabled")
        return config.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    return "online" if has_key else "offline"


def build_loggers(
    wandb_config: WandbConfig, run_dir: Path, run_name: str, hparams: dict
) -> list[Logger]:
    """CSV logger into ``run_dir/logs``, plus a W&B logger when enabled."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if wandb_config.enabled:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=wandb_config.project,
                entity=wandb_config.entity,
                name=run_name,
                save_dir=str(run_dir),
                mode=wandb_mode(wandb_config),
                config=hparams,
            )
        )
    return loggers


def finish_tracking() -> None:
    """End the active W&B run, so the next job of a sweep starts its own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
