"""Summarise a `soft_prompting.train` run's divergent dataset as the discovery tables report it.

    python experiments/summarise_discovery.py RUN_DIR --pair toy_backdoor --seed 0 --wall-s 120 \
        --output experiments/results/discovery_toy_backdoor_seed0.json

Top-20 records: NLL ratio (prompt_nll / reference_nll), topic share (prompts naming a planted topic,
corpus.TOPIC_WORDS; for toy_backdoor the trigger word), prompts holding the trigger and the
strategies they came from, the top record's trigger. Reads only the run's JSONL.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from soft_prompting.organisms.corpus import BACKDOOR_TRIGGER, TOPIC_WORDS


def planted_words(pair: str) -> set[str]:
    if pair == "toy_backdoor":
        return {BACKDOOR_TRIGGER}
    return {w for words in TOPIC_WORDS.values() for w in words}


def summarise(run_dir: Path, pair: str, top: int = 20) -> dict:
    lines = (run_dir / "divergent_dataset.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    best = records[:top]
    ratios = [r["prompt_nll"] / r["reference_nll"] for r in best if r.get("prompt_nll")]
    words = planted_words(pair)
    on_topic = [r for r in best if words & set(r["prompt"].split())]
    holding = [r for r in best if BACKDOOR_TRIGGER in r["prompt"].split()]
    return {
        "pair": pair,
        "run_dir": str(run_dir),
        "num_records": len(records),
        "reference_nll": best[0].get("reference_nll") if best else None,
        "top20_nll_ratio_median": statistics.median(ratios) if ratios else None,
        "top20_nll_ratio_max": max(ratios) if ratios else None,
        "top20_topic_share": len(on_topic) / max(len(best), 1),
        "top20_trigger_prompts": len(holding),
        "top20_trigger_prompts_by_source": dict(Counter(r["source"] for r in holding)),
        "top20_sources": dict(Counter(r["source"] for r in best)),
        "all_sources": dict(Counter(r["source"] for r in records)),
        "all_trigger_prompts": sum(BACKDOOR_TRIGGER in r["prompt"].split() for r in records),
        "top_record": {
            k: best[0].get(k)
            for k in ("prompt", "trigger", "trigger_context", "prompt_nll", "source")
        }
        | {"kl": best[0]["metrics"]["kl_divergence"], "generation_2": best[0]["generation_2"]}
        if best
        else None,
        "top_records": [
            {
                "prompt": r["prompt"],
                "kl": round(r["metrics"]["kl_divergence"], 4),
                "prompt_nll": r.get("prompt_nll"),
                "trigger": r.get("trigger"),
                "source": r["source"],
            }
            for r in best
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pair", required=True)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--wall-s", type=float, help="train -> dataset wall time, measured outside")
    parser.add_argument("--note", help="what differs from the defaults")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    summary = {"seed": args.seed, "wall_s": args.wall_s, "note": args.note}
    summary |= summarise(args.run_dir, args.pair)
    text = json.dumps(summary, indent=1)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
