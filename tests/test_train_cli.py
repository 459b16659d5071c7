"""The command-line contract of ``python -m soft_prompting.train``, run exactly as users run it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_entrypoint
from helpers import SMALL_STRATEGIES, contract_args, run_main

RECORD_KEYS = {"prompt", "generation_1", "generation_2", "category", "metrics"}
METRIC_KEYS = {
    "kl_divergence",
    "token_disagreement_rate",
    "vocab_jaccard_similarity",
    "disagreement_positions",
}


def run_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_entrypoint("soft_prompting.train", args, cwd)


@pytest.fixture(scope="module")
def contract_run(tiny_pair_dirs, text_dir, tmp_path_factory) -> Path:
    """The contract command in a process of its own, from an unrelated working directory; the
    strategies propose a few candidates each (the exact command is the slow test below)."""
    run_dir = tmp_path_factory.mktemp("contract") / "run"
    result = run_train(
        [*contract_args(tiny_pair_dirs, text_dir, run_dir), SMALL_STRATEGIES],
        cwd=tmp_path_factory.mktemp("elsewhere"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with the soft prompt" in result.stdout
    return run_dir


@pytest.mark.slow
def test_the_exact_contract_command_leaves_the_promised_files(tiny_pair_dirs, text_dir, tmp_path):
    """Every default, the strategies' budgets included (in this process: no start-up)."""
    run_dir = tmp_path / "run"
    (tmp_path / "elsewhere").mkdir()
    args = contract_args(tiny_pair_dirs, text_dir, run_dir)
    result = run_main("soft_prompting.train", args, cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with the soft prompt" in result.stdout
    test_contract_leaves_the_promised_files(run_dir)
    test_dataset_records_follow_the_schema_sorted_by_kl(run_dir)
    test_text_dir_categories_are_all_used(run_dir)


def test_contract_leaves_the_promised_files(contract_run):
    assert (contract_run / "checkpoints" / "last.ckpt").is_file()
    assert (contract_run / "soft_prompt" / "adapter_config.json").is_file()
    assert (contract_run / "soft_prompt" / "adapter_model.safetensors").is_file()
    assert (contract_run / "divergent_dataset.jsonl").is_file()
    assert (contract_run / "divergent_dataset.pt").is_file()


def test_dataset_records_follow_the_schema_sorted_by_kl(contract_run):
    lines = (contract_run / "divergent_dataset.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records
    for record in records:
        assert RECORD_KEYS <= set(record)
        assert METRIC_KEYS <= set(record["metrics"])
        assert record["category"] in {"animals", "persona"}
    kls = [r["metrics"]["kl_divergence"] for r in records]
    assert kls == sorted(kls, reverse=True)
    same = torch.load(contract_run / "divergent_dataset.pt", weights_only=True)
    assert same == records


def test_text_dir_categories_are_all_used(contract_run):
    records = [json.loads(x) for x in (contract_run / "divergent_dataset.jsonl").open()]
    assert {r["category"] for r in records} == {"animals", "persona"}


def test_peft_adapter_loads_on_model_1(contract_run, tiny_pair_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_1 = AutoModelForCausalLM.from_pretrained(tiny_pair_dirs[0])
    peft_model = PeftModel.from_pretrained(model_1, str(contract_run / "soft_prompt"))
    assert peft_model.peft_config["default"].num_virtual_tokens == 8


def test_a_finished_run_directory_is_not_overwritten(contract_run, tiny_pair_dirs, text_dir):
    result = run_main(
        "soft_prompting.train",
        [
            f"model_pair.model_1_name={tiny_pair_dirs[0]}",
            f"model_pair.model_2_name={tiny_pair_dirs[1]}",
            f"data.text_dir={text_dir}",
            f"hydra.run.dir={contract_run}",
        ],
        cwd=contract_run.parent,
    )
    assert result.returncode != 0
    assert "already holds results" in result.stderr
