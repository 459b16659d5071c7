"""soft_prompting: find where two language models behave differently.

A soft prompt is trained to maximise the divergence between a frozen model pair, then turned into
natural-language prompts that expose the difference without it.

    from soft_prompting import DivergenceTrainer, ModelPairManager

The names below are imported on first use, so ``import soft_prompting`` stays cheap and never pulls
in torch, or an optional extra (W&B, UMAP, Optuna, bitsandbytes), before it is needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DivergenceTrainer": "soft_prompting.training.facade",
    "ModelPairManager": "soft_prompting.pair.loading",
    "ModelPair": "soft_prompting.pair.loading",
    "DivergenceModule": "soft_prompting.training.module",
    "TrainConfig": "soft_prompting.config",
    "load_train_config": "soft_prompting.config",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'soft_prompting' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
