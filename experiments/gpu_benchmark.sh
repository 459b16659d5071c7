#!/usr/bin/env bash
# The benchmark presets on one lent GPU (H100/H200), in about five minutes; JSON to stdout and $OUT.
#
#   bash experiments/gpu_benchmark.sh            # from the repository root (or anywhere)
#
# The GPU machine has no internet. It needs python3 with a CUDA build of torch and the project's
# runtime dependencies (transformers, peft, lightning, hydra-core, omegaconf, safetensors,
# tokenizers, torchmetrics, tqdm and their own dependencies). Whatever is missing there is carried
# as wheels in .whl/ (git-ignored; name it in the device tool's `carry`), e.g. prepared here with
#   pip download --only-binary=:all: --python-version 3.X --platform manylinux2014_x86_64 \
#       -d .whl transformers peft lightning hydra-core omegaconf safetensors tokenizers tqdm
# (add torch and the nvidia-* wheels only if the machine has no CUDA torch: several GB). The wheels
# are installed with --no-index --no-deps into /tmp/site, which goes first on PYTHONPATH; nothing
# is installed system-wide. The project itself runs from this checkout (PYTHONPATH), no install.
#
# Each preset has its own timeout; a failed or timed-out preset is reported and the next one runs.
# SMOKE=1 checks the script itself on a CPU machine in seconds (the tiny preset only).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_benchmark}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
SITE=/tmp/site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
log() { echo "[gpu_benchmark $(date +%H:%M:%S)] $*" >&2; }

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
names = ["transformers", "peft", "lightning", "safetensors", "tokenizers",
         "tqdm"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    log "missing python packages: $missing (carry their wheels in .whl/)"
    exit 2
fi
"$PYTHON" - <<'EOF' >&2
import torch, transformers, peft, lightning
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("transformers", transformers.__version__, "peft", peft.__version__,
      "lightning", lightning.__version__)
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

failed=()
run_preset() {  # name, timeout in seconds, benchmark arguments...
    local name=$1 limit=$2
    shift 2
    log "preset $name (limit ${limit}s): $*"
    if timeout --kill-after=10 "$limit" "$PYTHON" -m soft_prompting.benchmark --device "$DEVICE" \
        --json "$OUT/$name.json" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.log"; then
        log "preset $name done"
    else
        log "preset $name FAILED or timed out (rc $?); last lines of its log:"
        tail -n 20 "$OUT/$name.log" >&2 || true
        failed+=("$name")
    fi
}

if [ "${SMOKE:-0}" = 1 ]; then
    run_preset tiny 120 --preset tiny --threads 1 --no-memory
else
    # The small presets with the naive baselines (ratios) and the optional variants.
    run_preset body_heavy 60 --preset body_heavy --repeats 10 --gen-repeats 3 \
        --variants generic_head,bf16_autocast
    run_preset vocab_heavy 60 --preset vocab_heavy --repeats 10 --gen-repeats 3 \
        --variants generic_head,bf16_autocast
    # Llama-2-7B dimensions: bf16 weights, autocast, gradient checkpointing, batch 8 x 256; the
    # naive training baseline (an fp32 7B pair) does not fit beside it and is left out.
    run_preset llama7b 150 --preset llama7b --repeats 5 --gen-repeats 2
    # Without checkpointing (more memory, no recompute), if the first one went through.
    run_preset llama7b_no_checkpointing 60 --preset llama7b --no-gradient-checkpointing \
        --no-naive-gen --repeats 5 --gen-repeats 1
fi

"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.json"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
keys = ["train_step_s", "naive_train_step_s", "train_speedup", "gen_score_s", "naive_gen_score_s",
        "gen_speedup", "peak_gpu_mb", "naive_peak_gpu_mb", "train_tokens_per_s",
        "train_tflops_8n", "train_mfu_bf16", "gen_new_tokens_per_s",
        "train_bf16_autocast_step_s", "train_generic_head_step_s", "checks", "device"]
summary = {}
for path in sorted(out.glob("*.json")):
    if path.name == "summary.json":
        continue
    result = json.loads(path.read_text())
    summary[path.stem] = {k: result.get(k) for k in keys}
print(json.dumps(summary, indent=2))
EOF
if [ ${#failed[@]} -gt 0 ]; then
    log "failed presets: ${failed[*]}"
    exit 1
fi
