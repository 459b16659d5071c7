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

from soft_prompting.config import load_experiment_file, load_train_config, require_run_dir
from soft_prompting.errors import reported_errors


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--output-dir", help="run directory (default: the YAML's output_dir)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    args = parser.parse_args(argv)
    with reported_errors():
        merged, output_dir = load_experiment_file(args.config, args.overrides, args.output_dir)
        config = load_train_config(merged)
        output_dir = require_run_dir(output_dir)
        from soft_prompting.pair.loading import (
            ModelPairManager,  # torch and friends: after the checks
        )
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
