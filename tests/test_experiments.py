"""The seed README's three command lines (experiments/*.py), the example configs, and the notebook
with its script twin, run on a tiny random pair."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SMALL_STRATEGIES

from soft_prompting.config import load_train_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIGS = EXPERIMENTS / "configs"


def run_script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"} | (env or {})
    result = subprocess.run(
        [sys.executable, str(EXPERIMENTS / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def tiny_pair_overrides(tiny_pair_dirs, text_dir) -> list[str]:
    return [
        f"model_1_name={tiny_pair_dirs[0]}",
        f"model_2_name={tiny_pair_dirs[1]}",
        f"data.text_dir={text_dir}",
        "data.categories=null",
        "data.max_texts_per_category=12",
        "training.max_steps=3",
        "training.batch_size=4",
        "generation.num_prompts=6",
        "generation.num_generations_per_prompt=2",
        "generation.max_length=6",
        SMALL_STRATEGIES,
    ]


@pytest.fixture(scope="module")
def finished_run(tiny_pair_dirs, text_dir, tmp_path_factory) -> Path:
    """The seed's train command line with the shipped experiment.yaml, on the tiny pair."""
    run_dir = tmp_path_factory.mktemp("experiment") / "experiment_1"
    run_script(
        "train_divergence_soft_prompts.py",
        "--config",
        CONFIGS / "experiment.yaml",
        "--output-dir",
        run_dir,
        *tiny_pair_overrides(tiny_pair_dirs, text_dir),
    )
    return run_dir


@pytest.mark.parametrize("name", ["experiment.yaml", "comparison.yaml", "eval.yaml"])
def test_example_configs_are_valid_and_use_the_toy_organisms(name):
    config = load_train_config(CONFIGS / name)
    assert config.model_pair.model_1_name == "organism:base"
    assert config.model_pair.model_2_name.startswith("organism:")


def test_train_command_line_writes_the_documented_outputs(finished_run):
    for name in ("checkpoints/last.ckpt", "soft_prompt", "metrics.json", "divergent_dataset.jsonl"):
        assert (finished_run / name).exists(), name
    records = torch.load(finished_run / "divergent_dataset.pt", weights_only=True)
    assert 0 < len(records) <= 6  # held-out texts, at most generation.num_prompts
    kl = [r["metrics"]["kl_divergence"] for r in records]
    assert kl == sorted(kl, reverse=True)
    state = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["state_dict"]["soft_prompt"].shape == (8, 32)  # experiment.yaml: 8 tokens


def test_metrics_record_the_device_the_run_used_and_the_architecture(finished_run):
    environment = json.loads((finished_run / "metrics.json").read_text())["environment"]
    used = "cuda:" if torch.cuda.is_available() else "cpu ("  # training.accelerator=auto
    assert environment["device"].startswith(used), environment
    assert environment["architecture"] == platform.machine()


def test_train_command_line_reports_a_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_1_name: a\nmodel_2_name: b\ntraining:\n  lerning_rate: 0.1\n")
    script = load_script("train_divergence_soft_prompts.py")  # in this process: fast
    with pytest.raises(SystemExit) as exited:
        script.main(["--config", str(bad)])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "lerning_rate" in stderr and "Traceback" not in stderr


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXPERIMENTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_command_line_stands_for_the_evaluate_entrypoint(finished_run, tmp_path):
    script = load_script("evaluate_hard_prompts.py")
    prompts = finished_run / "divergent_dataset.pt"
    command = script.command_line(
        [
            "--config",
            str(CONFIGS / "eval.yaml"),
            "--prompts-file",
            str(prompts),
            "--output-dir",
            str(tmp_path / "evaluation"),
            "generation.num_generations_per_prompt=2",
        ]
    )
    assert command[1:3] == ["-m", "soft_prompting.evaluate"]
    assert "model_pair.model_1_name='organism:base'" in command
    assert f"prompts_file='{prompts}'" in command
    assert f"hydra.run.dir='{tmp_path / 'evaluation'}'" in command
    assert "generation.num_generations_per_prompt=2" in command
    assert not any(arg.startswith("output_dir") for arg in command)


@pytest.mark.slow
def test_evaluate_command_line_runs(finished_run, tiny_pair_dirs, tmp_path):
    if importlib.util.find_spec("soft_prompting.evaluate") is None:
        pytest.skip("soft_prompting.evaluate is not in this checkout yet")
    script = load_script("evaluate_hard_prompts.py")  # its main() here; evaluate in a process
    returncode = script.main(
        [
            "--config",
            str(CONFIGS / "eval.yaml"),
            "--prompts-file",
            str(finished_run / "divergent_dataset.pt"),
            "--output-dir",
            str(tmp_path / "evaluation"),
            f"model_1_name={tiny_pair_dirs[0]}",
            f"model_2_name={tiny_pair_dirs[1]}",
            "generation.num_generations_per_prompt=2",
            "generation.max_length=6",
            SMALL_STRATEGIES,  # the untrained-pipeline baseline's proposals
        ]
    )
    assert returncode == 0
    assert (tmp_path / "evaluation" / "summary.json").is_file()


@pytest.mark.slow
def test_comparison_command_line_compares_two_categories(tiny_pair_dirs, text_dir, tmp_path):
    script = load_script("run_model_comparison.py")  # its main() in this process: no start-up
    script.main(
        [
            "--config",
            str(CONFIGS / "comparison.yaml"),
            "--categories",
            "animals",
            "persona",
            "--output-dir",
            str(tmp_path / "comparisons"),
            *tiny_pair_overrides(tiny_pair_dirs, text_dir),
            "evaluate=false",
        ]
    )
    comparison = json.loads((tmp_path / "comparisons" / "comparison.json").read_text())
    assert set(comparison["categories"]) == {"animals", "persona"}
    assert (tmp_path / "comparisons" / "comparison.md").is_file()


def percent_cells(text: str) -> list[tuple[str, str]]:
    """Cells of a jupytext percent-format script: ``(kind, source)``."""
    cells = []
    for chunk in re.split(r"^# %%", text, flags=re.M)[1:]:
        header, _, body = chunk.partition("\n")
        kind = "markdown" if "[markdown]" in header else "code"
        lines = body.strip("\n").splitlines()
        if kind == "markdown":
            lines = [re.sub(r"^# ?", "", line) for line in lines]
        cells.append((kind, "\n".join(lines).strip("\n")))
    return cells


def test_the_notebook_and_its_script_twin_have_the_same_cells():
    notebook = json.loads((EXPERIMENTS / "inspect_run.ipynb").read_text())
    in_notebook = [
        (cell["cell_type"], "".join(cell["source"]).strip("\n")) for cell in notebook["cells"]
    ]
    assert in_notebook == percent_cells((EXPERIMENTS / "inspect_run.py").read_text())
    assert all(not cell.get("outputs") for cell in notebook["cells"])  # shipped clean


def python_kernel(folder: Path) -> str:
    """A Jupyter kernel spec running this very interpreter, in ``folder`` (put on JUPYTER_PATH):
    a user's own ``python3`` kernel may point at another Python without this package."""
    name = "soft-prompting-test"
    spec = folder / "kernels" / name
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "soft_prompting tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return name


def test_the_notebook_inspects_a_finished_run(finished_run, tmp_path, monkeypatch):
    """The notebook itself, executed cell by cell in a Jupyter kernel: a broken cell fails here."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel_name = python_kernel(tmp_path / "jupyter")
    environment = {"RUN_DIR": str(finished_run), "NUM_EXAMPLES": "3", "MPLBACKEND": "Agg"}
    for key, value in environment.items() | {"OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process' environment
    notebook = nbformat.read(EXPERIMENTS / "inspect_run.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name=kernel_name, timeout=300, resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    stdout = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("name") == "stdout"
    )
    assert stdout.count("    model_1: ") == 3
    assert "soft prompt: (8, 32)" in stdout
    png = finished_run / "inspect_run.png"
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_hard_prompt_benchmark_counts_fluency_triggers_and_strategies():
    benchmark = load_script("hard_prompt_benchmark.py")
    records = [
        {"prompt": "my name is pickles", "source": "soft_prompt_exploration", "trigger": "pickles"},
        {"prompt": "what is two plus two", "source": "category_text"},
        {"prompt": "call me pickles please", "source": "soft_prompt_exploration"},
        {"prompt": "the cat sat", "source": "category_text"},
    ]
    for record, nll in zip(records, (1.0, 2.0, 3.0, 8.0), strict=True):
        record |= {"prompt_nll": nll, "reference_nll": 2.0}
    # 20 more, unscored for fluency: 16 of them reach the top 20, 4 do not
    records += [{"prompt": f"text {i}", "source": "contrastive_exploration"} for i in range(20)]
    stats = benchmark.prompt_stats(records, ("backdoor",))
    assert stats["top_nll_ratio_median"] == 1.25  # ratios 0.5, 1, 1.5, 4
    assert stats["top_trigger"] == "pickles"
    assert stats["by_source"] == {
        "category_text": {"records": 2, "in_top": 2, "topic_share": 0.0, "nll_ratio_median": 2.5},
        "soft_prompt_exploration": {
            "records": 2,
            "in_top": 2,
            "topic_share": 1.0,
            "nll_ratio_median": 1.0,
        },
        "contrastive_exploration": {
            "records": 20,
            "in_top": 16,
            "topic_share": 0.0,
            "nll_ratio_median": None,
        },
    }
    later = {
        "scenario": "backdoor",
        "seed": 1,
        "by_source": {"category_text": stats["by_source"]["category_text"]},
    }
    table = benchmark.strategy_table([{"scenario": "backdoor", "seed": 0, **stats}, later])
    # seed by seed; a strategy with no record in seed 1 shows a dash there
    assert "| backdoor | soft_prompt_exploration | 2/– | 2/– | 1.00/– | 1.00/– |" in table
    assert "| backdoor | category_text | 2/2 | 2/2 | 0.00/0.00 | 2.50/2.50 |" in table
