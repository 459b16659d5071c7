"""experiments/gpu_benchmark.sh, prepared for a lent GPU, checked here on the CPU: it parses, refuses
an unknown part, and its SMOKE dry run (tiny preset, tiny whole pipeline) writes the raw JSON with
the device name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_benchmark.sh"


def run_script(*args: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    environment = os.environ | {"OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=900
    )


def test_the_script_parses_and_refuses_an_unknown_part(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    result = run_script("everything", out=tmp_path)
    assert result.returncode == 2
    assert "unknown part 'everything': use train, pipeline, small or all" in result.stderr


@pytest.mark.slow
def test_the_dry_run_writes_raw_json_with_the_device_name(tmp_path):
    results = tmp_path / "results"
    result = run_script(
        out=tmp_path / "out",
        SMOKE="1",
        RESULTS=str(results),
        WORKDIR=str(tmp_path / "runs"),
        OMP_NUM_THREADS="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    bench = json.loads((out / "tiny.json").read_text())
    from soft_prompting.pair.placement import cpu_has_native_bf16

    # mixed_precision=auto on this CPU: bf16 autocast exactly where the CPU has native bf16.
    assert bench["train_precision"] == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")
    # The 7B run's generation variant, here on the CPU's default (growing) cache: same text.
    assert bench["gen_vs_growing_cache"] > 0
    assert bench["checks"]["gen_growing_cache_same_generation_1"] == 1.0
    pipeline = json.loads((out / "pipeline_tiny.json").read_text())
    assert pipeline["records"] == 2 and pipeline["pipeline_s"] > 0
    assert pipeline["evaluation"]["environment"]["device"].startswith("cpu")
    (raw,) = out.glob("gpu_*.json")
    merged = json.loads(raw.read_text())
    assert merged["device_name"] and {"tiny", "pipeline_tiny"} <= set(merged)
    assert not results.exists()  # a dry run never writes into experiments/results
