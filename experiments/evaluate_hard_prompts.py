"""Evaluate hard prompts without any soft prompt: reliability and lift over baselines.

    python experiments/evaluate_hard_prompts.py --config experiments/configs/eval.yaml \
        --prompts-file outputs/experiment_1/divergent_dataset.pt --output-dir outputs/evaluation

A front end to ``python -m soft_prompting.evaluate``: the YAML (the seed's experiment layout, or the
evaluate config's own) and any ``key=value`` arguments become that entrypoint's overrides, with
``prompts_file`` and ``hydra.run.dir`` from the flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from soft_prompting.config import load_experiment_file, require_run_dir, to_overrides
from soft_prompting.errors import ConfigError, DataError, reported_errors

ENTRYPOINT = "soft_prompting.evaluate"


def command_line(argv: list[str] | None = None) -> list[str]:
    """The ``python -m soft_prompting.evaluate ...`` command these flags stand for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="evaluation YAML")
    parser.add_argument("--prompts-file", required=True, help=".pt, .jsonl or .txt (one a line)")
    parser.add_argument("--output-dir", help="run directory (default: the YAML's output_dir)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    args = parser.parse_args(argv)
    merged, output_dir = load_experiment_file(args.config, args.overrides, args.output_dir)
    if not Path(args.prompts_file).is_file():
        raise DataError(f"--prompts-file {args.prompts_file!r} does not exist")
    output_dir = require_run_dir(output_dir)
    merged = OmegaConf.merge(
        merged,
        {"prompts_file": str(Path(args.prompts_file).resolve())},
        {"hydra": {"run": {"dir": str(output_dir)}}},
    )
    return [sys.executable, "-m", ENTRYPOINT, *to_overrides(OmegaConf.to_container(merged))]


def main(argv: list[str] | None = None) -> int:
    with reported_errors():
        command = command_line(argv)
        if importlib.util.find_spec(ENTRYPOINT) is None:
            raise ConfigError(
                f"this installation has no {ENTRYPOINT}: update soft-prompting to evaluate prompts"
            )
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
