"""The whole pipeline on a random-weight pair of a benchmark preset, timed stage by stage.

    python experiments/pipeline_benchmark.py --preset llama7b --json pipeline.json

Issue 15's workload: train 200 steps at 8×256 → write the divergent dataset from 256 candidates,
4 samples × 64 new tokens each → evaluate it (default baselines and confirmation). The stages are
the real ones: ``soft_prompting.train.train`` (fit, validation, export, dataset) and
``soft_prompting.evaluate.evaluate``, at the project's defaults (``training.accelerator=auto``,
``mixed_precision=auto``, ``torch_dtype=auto``). Only the pair is special: two random-init Llamas of
the preset (``soft_prompting.benchmark.build_pair``, nothing downloaded or written to disk: a 7B pair
would need 27 GB of folders), handed to every stage under the names ``random:PRESET:1`` and ``:2``,
and texts of random words of its synthetic tokenizer.

Writes one JSON: seconds per stage (fit+validation, dataset, evaluate), the run's metrics, the
record count, peak GPU memory and the device. ``--preset tiny --steps 2 --candidates 4
--new-tokens 4`` checks the script on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from soft_prompting import benchmark
from soft_prompting.config import load_train_config
from soft_prompting.evaluate import EvaluateConfig, evaluate
from soft_prompting.pair.loading import ModelPairManager
from soft_prompting.pair.placement import lightning_precision, resolve_device
from soft_prompting.train import train
from soft_prompting.training import pipeline


def serve_pair_by_name(pair, names: tuple[str, str]) -> None:
    """Every ``ModelPairManager`` asked for ``names`` gets ``pair`` (other names load as usual)."""
    load = ModelPairManager._load

    def _load(self, name_1, name_2, revision_1, revision_2):
        if (name_1, name_2) == names:
            return pair
        return load(self, name_1, name_2, revision_1, revision_2)

    ModelPairManager._load = _load


def write_texts(folder: Path, count: int, words: int, vocab_size: int, seed: int = 0) -> Path:
    """``count`` texts of ``words`` random words of the synthetic tokenizer (``w0 w1 …``)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - 4, (count, words), generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    lines = (" ".join(f"w{i}" for i in row.tolist()) for row in ids)
    (folder / "synthetic.txt").write_text("\n".join(lines) + "\n")
    return folder


def run(args: argparse.Namespace) -> dict:
    """Build the pair, run train (fit, validation, dataset) and evaluate; the timings."""
    device = resolve_device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # what torch_dtype=auto loads
    settings = benchmark.Settings(preset=args.preset, device=str(device), dtype=dtype)
    names = (f"random:{args.preset}:1", f"random:{args.preset}:2")
    started = time.perf_counter()
    pair = benchmark.build_pair(settings)
    build_s = time.perf_counter() - started
    serve_pair_by_name(pair, names)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pipeline_benchmark_"))
    # Enough texts for the steps at one epoch, plus the held-out share.
    texts = args.steps * args.batch_size * 100 // 85 + 2
    text_dir = write_texts(root / "texts", texts, args.seq_len, pair.vocab_size)
    config = load_train_config(
        {
            "model_pair": {"model_1_name": names[0], "model_2_name": names[1]},
            "training": {
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "gradient_checkpointing": args.gradient_checkpointing,
                "val_check_interval": 1.0,
            },
            "data": {
                "text_dir": str(text_dir),
                "max_length": args.seq_len,
                "max_texts_per_category": texts,
            },
            "generation": {
                "num_prompts": args.candidates,
                "num_generations_per_prompt": args.samples,
                "max_length": args.new_tokens,
                "batch_size": args.generation_batch,
            },
            "seed": 0,
        }
    )
    stages: dict[str, float] = {}
    write_dataset = pipeline.write_dataset

    def timed_dataset(*a, **k):
        start = time.perf_counter()
        try:
            return write_dataset(*a, **k)
        finally:
            stages["dataset_s"] = time.perf_counter() - start

    pipeline.write_dataset = timed_dataset
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_dir = root / "run"
    start = time.perf_counter()
    metrics = train(config, run_dir)
    stages["train_total_s"] = time.perf_counter() - start
    stages["fit_and_validate_s"] = stages["train_total_s"] - stages.get("dataset_s", 0.0)
    records = [json.loads(line) for line in (run_dir / "divergent_dataset.jsonl").open()]
    if args.json:  # what is measured so far survives a timeout in the evaluation
        partial = {"preset": args.preset, **stages, "records": len(records), "metrics": metrics}
        Path(args.json).write_text(json.dumps(partial | {"evaluate_s": None}, default=str) + "\n")
    evaluation = EvaluateConfig(
        model_pair=config.model_pair,
        generation=config.generation,
        data=config.data,
        training=config.training,
        prompts_file=str(run_dir / "divergent_dataset.jsonl"),
        baseline_candidates=args.candidates,
        confirm_generations=args.confirm_generations,
    )
    start = time.perf_counter()
    summary = evaluate(evaluation, run_dir / "evaluation")
    stages["evaluate_s"] = time.perf_counter() - start
    total = stages["train_total_s"] + stages["evaluate_s"]
    result = {
        "preset": args.preset,
        "workload": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "candidates": args.candidates,
            "samples": args.samples,
            "new_tokens": args.new_tokens,
            "generation_batch": args.generation_batch,
            "gradient_checkpointing": args.gradient_checkpointing,
            "confirm_generations": args.confirm_generations,
        },
        "build_pair_s": build_s,
        **stages,
        "pipeline_s": total,
        "pipeline_minutes": total / 60,
        "precision": lightning_precision(config.training.mixed_precision, device),
        "weights_dtype": str(pair.model_1.dtype),
        "metrics": metrics,
        "records": len(records),
        "evaluation": {
            "num_prompts": summary["num_prompts"],
            "num_discoveries": summary["num_discoveries"],
            "environment": summary["environment"],
        },
        "device": benchmark.describe_device(settings),
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(benchmark.MODELS), default="llama7b")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (training.accelerator)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=256, help="generation.num_prompts")
    parser.add_argument("--samples", type=int, default=4, help="generations per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--generation-batch", type=int, default=64, help="prompts per batch")
    parser.add_argument("--confirm-generations", type=int, default=16)
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False
    )
    parser.add_argument("--workdir", help="where the run directory goes (default: a temp dir)")
    parser.add_argument("--json", help="write the result here (also printed)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
