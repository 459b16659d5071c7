"""Train a soft prompt from an experiment YAML, then write the divergent dataset.

    python experiments/train_divergence_soft_prompts.py \
        --config experiments/configs/experiment.yaml --output-dir outputs/experiment_1

The YAML may be the seed README's experiment file (name, output_dir, model_1_name, model_2_name,
training, generation, data) or a config in ``TrainConfig``'s layout; ``key=value`` arguments after
it override it (``training.max_steps=20``, ``model_1_name=/models/a``). The recipe is the one of
``python -m soft_prompting.train``: ``--output-dir`` receives ``checkpoints/last.ckpt``,
``soft_prompt/``, ``metrics.json`` and ``divergent_dataset.{jsonl,pt}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from soft_prompting.config import experiment_to_dict, load_train_config
from soft_prompting.errors import ConfigError, reported_errors


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--output-dir", help="run directory (default: the YAML's output_dir)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    args = parser.parse_args(argv)
    with reported_errors():
        if not Path(args.config).is_file():
            raise ConfigError(f"--config {args.config!r} does not exist")
        experiment = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)
        overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.overrides))
        config = load_train_config(
            OmegaConf.merge(experiment_to_dict(experiment), experiment_to_dict(overrides))
        )
        output_dir = args.output_dir or experiment.get("output_dir")
        if not output_dir:
            raise ConfigError("no run directory: pass --output-dir or set output_dir in the YAML")
        from soft_prompting.models import ModelPairManager  # torch and friends: after the checks
        from soft_prompting.tracking import finish_tracking
        from soft_prompting.train import train

        try:
            metrics = train(config, Path(output_dir))
        finally:
            finish_tracking()
            ModelPairManager.clear_cache()
    return metrics["val/divergence"]


if __name__ == "__main__":
    main(sys.argv[1:])
