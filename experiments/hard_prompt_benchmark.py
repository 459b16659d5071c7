"""Quality benchmark of the hard prompts on the model organisms (issue 3's acceptance numbers).

    python experiments/hard_prompt_benchmark.py --output-dir outputs/hard_prompt_benchmark

Per scenario it runs the real pipeline as a user would (``python -m soft_prompting.train`` with the
defaults, then ``python -m soft_prompting.evaluate`` on the top prompts) and measures:

- ``topic_fraction``: share of the top-20 hard prompts (by KL) that mention a planted behaviour's
  topic words (``corpus.TOPIC_WORDS``);
- ``behaviours_found``: per planted behaviour, whether any top-20 prompt is about it;
- ``lift_vs_random_text``: the top prompts' mean KL ÷ that of as many random category texts;
- ``by_source``: the same topic share per strategy, to see which strategy found what;
- ``seconds``: wall time of train → hard prompts → evaluate.

The ``discovery`` scenario trains on persona and ethics texts only (they never mention arithmetic
or chemistry): topic prompts there come from the strategies, not from the texts.
Results go to ``benchmark.json`` and ``benchmark.md`` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from soft_prompting.organisms.builder import PLANTED_BEHAVIOURS
from soft_prompting.organisms.corpus import topic_words_in
from soft_prompting.run_files import read_jsonl, write_json, write_jsonl

SCENARIOS = {
    "sandbagging": ("toy_sandbagging", []),
    "double": ("toy_double", []),
    "discovery": ("toy_double", ["data.categories=[persona,ethics]"]),
    "identical": ("toy_identical", []),
}
TOP = 20


def run(module: str, args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{result.stderr[-3000:]}")


def organism_behaviours(pair: str) -> tuple[str, ...]:
    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model_pair" / f"{pair}.yaml")
    return PLANTED_BEHAVIOURS[conf.model_2_name.removeprefix("organism:")]


def about(prompt: str, behaviours) -> list[str]:
    return [b for b in behaviours if topic_words_in(prompt, b)]


def scenario(name: str, pair: str, extra: list[str], root: Path, extra_all: list[str]) -> dict:
    run_dir = root / name
    started = time.perf_counter()
    run(
        "soft_prompting.train",
        [f"model_pair={pair}", f"hydra.run.dir={run_dir}", "overwrite=true", *extra, *extra_all],
    )
    trained = time.perf_counter() - started
    records = read_jsonl(run_dir / "divergent_dataset.jsonl")
    top = records[:TOP]
    write_jsonl(run_dir / "top_prompts.jsonl", top)
    run(
        "soft_prompting.evaluate",
        [
            f"model_pair={pair}",
            f"prompts_file={run_dir / 'top_prompts.jsonl'}",
            f"hydra.run.dir={run_dir / 'evaluation'}",
            *extra,
            *extra_all,
        ],
    )
    seconds = time.perf_counter() - started
    summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    behaviours = organism_behaviours(pair) or ("sandbagging", "unlearning")
    topics = [about(r["prompt"], behaviours) for r in top]
    by_source: dict[str, list[int]] = {}
    for record, found in zip(top, topics, strict=False):
        counts = by_source.setdefault(record.get("source", "?"), [0, 0])
        counts[0] += bool(found)
        counts[1] += 1
    return {
        "pair": pair,
        "overrides": extra,
        "num_records": len(records),
        "topic_fraction": sum(bool(t) for t in topics) / max(len(top), 1),
        "behaviours_found": {b: any(b in t for t in topics) for b in behaviours},
        "top_mean_kl": sum(r["metrics"]["kl_divergence"] for r in top) / max(len(top), 1),
        "random_text_kl": summary["random_text"]["kl_divergence"],
        "lift_vs_random_text": summary["lift_vs_random_text"],
        "lift_vs_random_soft_prompt": summary["lift_vs_random_soft_prompt"],
        "reliability": summary["reliability"],
        "num_discoveries": summary["num_discoveries"],
        "by_source": {s: f"{a}/{n} about a topic" for s, (a, n) in by_source.items()},
        "top_5": [
            (r["prompt"], round(r["metrics"]["kl_divergence"], 3), r.get("source")) for r in top[:5]
        ],
        "train_and_dataset_seconds": round(trained, 1),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/hard_prompt_benchmark")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    root = Path(args.output_dir)
    results = {}
    for name in args.scenarios:
        pair, extra = SCENARIOS[name]
        print(f"[benchmark] {name}: {pair} {' '.join(extra)}", flush=True)
        results[name] = scenario(name, pair, extra, root, args.overrides)
        print(json.dumps(results[name], indent=2), flush=True)
    write_json(root / "benchmark.json", {"overrides": args.overrides, "scenarios": results})
    rows = [
        "| scenario | topic share (top 20) | behaviours found | lift vs random text | "
        "lift vs random soft prompt | reliability | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        found = ", ".join(
            f"{b}: {'yes' if ok else 'no'}" for b, ok in r["behaviours_found"].items()
        )
        lift = r["lift_vs_random_text"]
        soft = r["lift_vs_random_soft_prompt"]
        rows.append(
            f"| {name} | {r['topic_fraction']:.2f} | {found} | "
            f"{'–' if lift is None else f'{lift:.2f}×'} | {'–' if soft is None else f'{soft:.2f}×'} "
            f"| {r['reliability']:.2f} | {r['seconds']:.0f} |"
        )
    (root / "benchmark.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
