"""``python -m soft_prompting.evaluate``: prompts files, baselines, lift and reliability."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_entrypoint

from soft_prompting.errors import DataError
from soft_prompting.evaluate import is_discovery, lift, read_prompts


def run_evaluate(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_entrypoint("soft_prompting.evaluate", args, cwd)


def pair_args(tiny_pair_dirs, text_dir) -> list[str]:
    return [
        f"model_pair.model_1_name={tiny_pair_dirs[0]}",
        f"model_pair.model_2_name={tiny_pair_dirs[1]}",
        f"data.text_dir={text_dir}",
        "generation.max_length=4",
        "generation.num_generations_per_prompt=2",
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".pt", ".txt"])
def test_prompts_files_of_every_kind_are_read(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    records = [{"prompt": "the cat sat", "category": "animals", "source": "x"}, {"text": "i am"}]
    if suffix == ".txt":
        path.write_text("the cat sat\n\ni am\n")
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        torch.save(records, path)
    assert [r["prompt"] for r in read_prompts(path)] == ["the cat sat", "i am"]


@pytest.mark.parametrize(
    "content, message",
    [("", "holds no prompts"), ('{"nope": 1}\n', "no non-empty 'prompt'"), ("{bad\n{x\n", "JSON")],
)
def test_empty_or_malformed_prompts_file_is_a_data_error(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_lift_and_discovery_are_relative_to_the_baseline():
    assert lift(0.6, 0.2) == pytest.approx(3.0)
    assert lift(0.0, 0.0) is None  # identical models: no baseline to beat, no lift claimed
    record = {"metrics": {"kl_divergence": 0.5}}
    assert is_discovery(record, baseline=0.1)
    assert not is_discovery(record, baseline=0.2)  # only 2.5x the baseline
    assert not is_discovery({"metrics": {"kl_divergence": 0.0}}, baseline=0.0)


def test_evaluate_cli_writes_summary_table_and_resumes(tiny_pair_dirs, text_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on\ni am a helpful\nwhat is one plus\n")
    run_dir = tmp_path / "evaluation"
    args = [
        *pair_args(tiny_pair_dirs, text_dir),
        f"prompts_file={prompts}",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_evaluate(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_prompts"] == 3 and summary["random_text"]["num_texts"] == 3
    assert summary["lift_vs_random_text"] == pytest.approx(
        summary["prompts"]["kl_divergence"] / summary["random_text"]["kl_divergence"]
    )
    assert summary["lift_vs_random_soft_prompt"] > 0
    assert 0 <= summary["reliability"] <= 1
    records = [json.loads(line) for line in (run_dir / "evaluated_prompts.jsonl").open()]
    assert sorted(r["prompt"] for r in records) == sorted(prompts.read_text().split("\n")[:3])
    assert all("discovery" in r for r in records)
    assert "| rank | prompt |" in (run_dir / "evaluation.md").read_text()
    assert not list(run_dir.glob("*.partial.jsonl"))


def test_evaluate_cli_rejects_an_empty_prompts_file(tiny_pair_dirs, text_dir, tmp_path):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n\n")
    args = [
        *pair_args(tiny_pair_dirs, text_dir),
        f"prompts_file={prompts}",
        f"hydra.run.dir={tmp_path / 'e'}",
    ]
    result = run_evaluate(args, cwd=tmp_path)
    assert result.returncode == 2
    assert "holds no prompts" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_cli_needs_a_prompts_file(tmp_path):
    result = run_evaluate([f"hydra.run.dir={tmp_path / 'e'}"], cwd=tmp_path)
    assert result.returncode == 2 and "prompts_file" in result.stderr
