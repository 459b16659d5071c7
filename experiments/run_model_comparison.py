"""Compare a model pair across behaviour categories: one soft prompt and divergent dataset each.

    python experiments/run_model_comparison.py --config experiments/configs/comparison.yaml \
        --categories sandbagging unlearning --output-dir outputs/comparisons

A front end to ``python -m soft_prompting.compare`` (:func:`soft_prompting.compare.compare`): the
YAML (the seed's experiment layout, or the compare config's own) and any ``key=value`` arguments
become overrides of the compare entrypoint's Hydra config; ``--output-dir`` receives
``comparison.json``, ``comparison.md`` and one train run directory per category.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from soft_prompting.config import (
    load_experiment_file,
    require_run_dir,
    to_overrides,
    to_train_config,
)
from soft_prompting.errors import reported_errors


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="comparison YAML")
    parser.add_argument(
        "--categories", nargs="+", help="categories to compare (default: the YAML's)"
    )
    parser.add_argument("--output-dir", help="run directory (default: the YAML's output_dir)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    args = parser.parse_args(argv)
    with reported_errors():
        categories = [c for c in args.categories or [] if "=" not in c]
        extra = args.overrides + [c for c in args.categories or [] if "=" in c]
        merged, output_dir = load_experiment_file(args.config, extra, args.output_dir)
        output_dir = require_run_dir(output_dir)
        merged = OmegaConf.merge(merged, {"categories": categories} if categories else {})
        from soft_prompting.compare import compare  # also registers the compare schema

        with initialize_config_module("soft_prompting.conf", version_base=None):
            cfg = compose("compare", overrides=to_overrides(OmegaConf.to_container(merged)))
        return compare(to_train_config(cfg), Path(output_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
