"""Training-step time of K soft prompts (training.num_prompts) against one, side by side.

    python experiments/several_prompts_benchmark.py --prompts 3 --steps 8 --threads 1

On the default organism pair and the default batch (16 texts, data.max_length=64), one optimiser
step's forward + backward is timed, interleaved round by round, for:

- ``one``: a single prompt (the default run's step);
- ``batched``: K prompts, the batch replicated over them inside one forward of each model (what
  ``training.num_prompts=K`` does), diversity term included;
- ``loop``: the same K prompts as K separate single-prompt forwards (what batching replaces).

It prints the median seconds per step and the ratios batched/one and loop/batched; ``--json``
writes them too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from soft_prompting.config import TrainConfig
from soft_prompting.pair.loading import ModelPairManager
from soft_prompting.training import pipeline
from soft_prompting.training.module import DivergenceModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model-1", default="organism:base")
    parser.add_argument("--model-2", default="organism:sandbagging")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig()
    config.model_pair.model_1_name, config.model_pair.model_2_name = args.model_1, args.model_2
    pair = ModelPairManager(device="cpu", torch_dtype="float32").load_model_pair(
        args.model_1, args.model_2
    )
    common = {
        "model_1_name": args.model_1,
        "model_2_name": args.model_2,
        "num_soft_prompt_tokens": config.training.num_soft_prompt_tokens,
        "pair": pair,
    }
    one = DivergenceModule(**common)
    several = DivergenceModule(**common, num_prompts=args.prompts)
    datamodule = pipeline.build_datamodule(one, config)
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())

    def step_one(batch):
        (-one.divergence(batch["input_ids"], batch["attention_mask"])).backward()

    def step_batched(batch):
        several.training_step(batch, 0).backward()

    def step_loop(batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for k in range(args.prompts):
            (-one.divergence(ids, mask, prompt=several.soft_prompt[k]) / args.prompts).backward()

    kinds = {"one": step_one, "batched": step_batched, "loop": step_loop}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for round_number in range(args.steps + 1):
        batch = next(batches)
        for name, step in kinds.items():
            one.zero_grad(), several.zero_grad()
            start = time.perf_counter()
            step(batch)
            if round_number:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "prompts": args.prompts,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "pair": [args.model_1, args.model_2],
        "median_seconds": medians,
        "batched_over_one": medians["batched"] / medians["one"],
        "loop_over_batched": medians["loop"] / medians["batched"],
    }
    for name, value in medians.items():
        print(f"{name:8s} {value * 1000:8.1f} ms/step (median of {args.steps})")
    print(
        f"K={args.prompts}: batched/one = {result['batched_over_one']:.2f}x, "
        f"loop/batched = {result['loop_over_batched']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
