#!/usr/bin/env bash
# Issue 15's GPU measurements on one lent GPU; raw JSON with the device name goes to $OUT and to
# experiments/results/gpu_<device>.json.
#
#   bash experiments/gpu_benchmark.sh train      # 7B-architecture pair: training MFU with and
#                                                # without checkpointing, generation tokens/s, a
#                                                # profile of the step (~5 min)
#   bash experiments/gpu_benchmark.sh pipeline   # the whole pipeline on that pair (9 min limit)
#   bash experiments/gpu_benchmark.sh small      # body_heavy and vocab_heavy with naive baselines
#   bash experiments/gpu_benchmark.sh            # train, then pipeline
#   SMOKE=1 bash experiments/gpu_benchmark.sh    # dry run on a CPU: tiny preset, tiny pipeline
#
# A device command may run 10 minutes at most, so a session runs `train` and `pipeline` as two
# commands. Every pair is random-init from the preset's config (Llama-2-7B dimensions for
# llama7b): nothing is downloaded and nothing of it is written to disk. Everything runs at the
# project's defaults: training.accelerator=auto, mixed_precision=auto and torch_dtype=auto (bf16
# weights and autocast on a GPU with bf16).
#
# The GPU machine has no internet. It needs python3 with a CUDA build of torch and the project's
# runtime dependencies (transformers, peft, lightning, hydra-core, omegaconf, safetensors,
# tokenizers, torchmetrics, tqdm, scipy and their own dependencies). Whatever is missing there is
# carried as wheels in .whl/ (git-ignored; name it in the device tool's `carry`), e.g. prepared with
#   pip download --only-binary=:all: --python-version 3.X --platform manylinux2014_x86_64 \
#       -d .whl transformers peft lightning hydra-core omegaconf safetensors tokenizers tqdm
# (add torch and the nvidia-* wheels only if the machine has no CUDA torch: several GB). The wheels
# are installed with --no-index --no-deps into /tmp/site, which goes first on PYTHONPATH; nothing
# is installed system-wide. The project itself runs from this checkout (PYTHONPATH), no install.
#
# Each part has its own timeout; a failed or timed-out part is reported and the next one runs.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_benchmark}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
SITE=/tmp/site
RESULTS="${RESULTS:-experiments/results}"
PART="${1:-all}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
log() { echo "[gpu_benchmark $(date +%H:%M:%S)] $*" >&2; }

case "$PART" in
    train | pipeline | small | all) ;;
    *) log "unknown part '$PART': use train, pipeline, small or all"; exit 2 ;;
esac

if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi

if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    log "python3 cannot import torch: carry a CUDA torch wheel (and its nvidia-* wheels) in .whl/"
    exit 2
fi
missing=$("$PYTHON" - <<'EOF'
import importlib.util
names = ["transformers", "peft", "lightning", "safetensors", "tokenizers", "tqdm", "hydra",
         "omegaconf", "scipy", "torchmetrics"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    log "missing python packages: $missing (carry their wheels in .whl/)"
    exit 2
fi
"$PYTHON" - <<'EOF' >&2
from importlib.metadata import version  # the versions without importing the packages: faster

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print(*(f"{name} {version(name)}" for name in ("transformers", "peft", "lightning")))
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.mem_get_info())
EOF
DEVICE=cuda
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu
elif ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "torch sees no CUDA device"
    exit 2
else
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >&2 || true
fi

rm -f "$OUT"/*.failed  # a part that fails leaves $OUT/NAME.failed (parts may run side by side)
run_part() {  # name, timeout in seconds, command...
    local name=$1 limit=$2
    shift 2
    log "$name (limit ${limit}s): $*"
    if timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.log"; then
        log "$name done"
    else
        log "$name FAILED or timed out (rc $?); last lines of its log:"
        tail -n 20 "$OUT/$name.log" >&2 || true
        touch "$OUT/$name.failed"
    fi
}
bench() {  # name, timeout, soft_prompting.benchmark arguments...
    local name=$1 limit=$2
    shift 2
    run_part "$name" "$limit" "$PYTHON" -m soft_prompting.benchmark --device "$DEVICE" \
        --json "$OUT/$name.json" "$@"
}
pipeline() {  # name, timeout, experiments/pipeline_benchmark.py arguments...
    local name=$1 limit=$2
    shift 2
    run_part "$name" "$limit" "$PYTHON" experiments/pipeline_benchmark.py --device "$DEVICE" \
        --json "$OUT/$name.json" --workdir "${WORKDIR:-/tmp/gpu_benchmark_runs}/$name" "$@"
}

if [ "${SMOKE:-0}" = 1 ]; then  # side by side: a dry run measures nothing
    trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # an interrupted dry run leaves no part behind
    bench tiny 120 --preset tiny --threads 1 --no-memory --repeats 1 --gen-repeats 1 \
        --variants growing_cache &
    pipeline pipeline_tiny 300 --preset tiny --steps 2 --batch-size 2 --seq-len 16 \
        --candidates 2 --samples 2 --new-tokens 4 --generation-batch 2 --confirm-generations 2 &
    wait
else
    if [ "$PART" = train ] || [ "$PART" = all ]; then
        # Llama-2-7B dimensions, bf16, batch 8 x 256 (+ 8 virtual tokens); generation and scoring
        # of 64 prompts x 64 new tokens for both models. The naive baselines (an fp32 7B pair, a
        # recompute-everything decoder) are left out: they do not fit the device time. Generation
        # is also timed over a cache that grows per token, beside the default static one.
        bench llama7b_no_checkpointing 200 --preset llama7b --no-gradient-checkpointing \
            --repeats 5 --gen-repeats 2 --variants growing_cache
        bench llama7b 200 --preset llama7b --repeats 5 --gen-repeats 1
        # Where the step's time goes: torch.profiler's top kernels by device time.
        bench llama7b_profile 120 --preset llama7b --no-gradient-checkpointing --profile
    fi
    if [ "$PART" = pipeline ] || [ "$PART" = all ]; then
        # Train 200 steps at 8 x 256, 256 candidates x 4 samples x 64 tokens, evaluate.
        pipeline pipeline_llama7b 540 --preset llama7b
    fi
    if [ "$PART" = small ]; then
        bench body_heavy 90 --preset body_heavy --repeats 10 --gen-repeats 3 \
            --variants generic_head,fp32
        bench vocab_heavy 90 --preset vocab_heavy --repeats 10 --gen-repeats 3 \
            --variants generic_head,fp32
    fi
fi

"$PYTHON" - "$OUT" "$RESULTS" "${SMOKE:-0}" <<'EOF' | tee "$OUT/summary.json"
import json, pathlib, re, sys

out, results, smoke = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
keys = ["train_step_s", "naive_train_step_s", "train_speedup", "train_precision", "gen_score_s",
        "gen_speedup", "peak_gpu_mb", "naive_peak_gpu_mb", "train_tokens_per_s", "train_tflops_8n",
        "train_mfu_bf16", "gen_new_tokens_per_s", "gen_cache", "gen_growing_cache_s",
        "gen_vs_growing_cache",
        "train_fp32_step_s", "pipeline_s",
        "pipeline_minutes", "fit_and_validate_s", "dataset_s", "evaluate_s", "records", "checks"]
raw, summary = {}, {}
for path in sorted(out.glob("*.json")):
    if path.name == "summary.json" or path.name.startswith("gpu_"):
        continue
    raw[path.stem] = json.loads(path.read_text())
    summary[path.stem] = {k: raw[path.stem][k] for k in keys if k in raw[path.stem]}
device = next((r["device"] for r in raw.values() if "device" in r), {})
name = device.get("gpu") or device.get("cpu") or "unknown"
summary["device_name"] = name
print(json.dumps(summary, indent=2))
# The raw results with the device they ran on, in one file named after it (parts run as separate
# commands are merged into it). A SMOKE run writes it to $OUT only.
file_name = "gpu_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".json"
target = out / file_name if smoke else results / file_name
target.parent.mkdir(parents=True, exist_ok=True)
merged = json.loads(target.read_text()) if target.is_file() else {}
merged.update(raw)
merged["device_name"] = name
target.write_text(json.dumps(merged, indent=2) + "\n")
if not smoke:
    (out / file_name).write_text(target.read_text())  # $OUT is what comes back from a device
print(f"raw results: {target}", file=sys.stderr)
EOF
shopt -s nullglob
failed=("$OUT"/*.failed)
if [ ${#failed[@]} -gt 0 ]; then
    log "failed: $(basename -a "${failed[@]%.failed}" | tr '\n' ' ')"
    exit 1
fi
