"""The walls between the stages hold: checked over the import graph, not by discipline.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``; ``lint-imports`` runs them by
hand). Imports inside functions count. Each contract is also shown to catch the import it forbids,
so a renamed module cannot quietly turn a wall into a no-op.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import torch
from importlinter import configuration
from importlinter.application.use_cases import read_user_options
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "soft_prompting"

configuration.configure()
OPTIONS = read_user_options(config_filename=str(ROOT / "pyproject.toml"))
CONTRACTS = {options["id"]: options for options in OPTIONS.contracts_options}
CONTRACT_TYPES = {"forbidden": ForbiddenContract, "layers": LayersContract}


def check(contract_id: str, extra_import: tuple[str, str] | None = None, new_module: str = ""):
    """Check one contract on the package's import graph, plus one import or module if given."""
    graph = grimp.build_graph("soft_prompting", cache_dir=None)
    if extra_import:
        importer, imported = extra_import
        graph.add_import(importer=importer, imported=imported, line_number=1, line_contents="")
    if new_module:
        graph.add_module(new_module)
    options = CONTRACTS[contract_id]
    contract = CONTRACT_TYPES[options["type"]](
        name=options["name"], session_options=OPTIONS.session_options, contract_options=options
    )
    return contract.check(graph, verbose=False)


def test_the_contracts_are_the_walls_the_architecture_promises():
    assert set(CONTRACTS) == {
        "pure-maths",
        "inputs-before-training",
        "results-readers",
        "stage-layers",
    }


@pytest.mark.parametrize("contract_id", sorted(CONTRACTS))
def test_the_package_keeps_the_contract(contract_id):
    if not check(contract_id).kept:
        report = subprocess.run(
            [str(Path(sys.executable).with_name("lint-imports")), "--contract", contract_id]
            + ["--no-cache", "--no-logo"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        pytest.fail(f"contract {contract_id} is broken:\n{report.stdout[-4000:]}")


@pytest.mark.parametrize(
    ("contract_id", "importer", "imported"),
    [
        ("pure-maths", "soft_prompting.maths.divergence", "soft_prompting.errors"),
        ("pure-maths", "soft_prompting.maths.chunked_head", "soft_prompting.config"),
        (
            "inputs-before-training",
            "soft_prompting.data.datamodule",
            "soft_prompting.training.module",
        ),
        (
            "inputs-before-training",
            "soft_prompting.pair.loading",
            "soft_prompting.hard_prompts.sampling",
        ),
        ("results-readers", "soft_prompting.analysis.patterns", "soft_prompting.training.pipeline"),
        ("results-readers", "soft_prompting.report.build", "soft_prompting.train"),
        ("results-readers", "soft_prompting.report.build", "soft_prompting.compare"),
        # A circle: training already imports hard_prompts.
        (
            "stage-layers",
            "soft_prompting.hard_prompts.strategies",
            "soft_prompting.training.module",
        ),
        ("stage-layers", "soft_prompting.pair.loading", "soft_prompting.data.datamodule"),
        # Siblings of one layer stay independent.
        ("stage-layers", "soft_prompting.hard_prompts.dataset", "soft_prompting.data.datamodule"),
    ],
)
def test_each_contract_catches_the_import_it_forbids(contract_id, importer, imported):
    assert not check(contract_id, (importer, imported)).kept


def test_a_new_stage_must_take_its_place_in_the_layers():
    assert not check("stage-layers", new_module="soft_prompting.new_stage").kept


def test_maths_is_walled_off_from_every_other_part_of_the_package():
    """The forbidden list names every sibling of maths, so a new module is not forgotten."""
    graph = grimp.build_graph("soft_prompting", cache_dir=None)
    siblings = graph.find_children("soft_prompting") - {"soft_prompting.maths"}
    assert siblings == set(CONTRACTS["pure-maths"]["forbidden_modules"])


# ---------------------------------------------------------------- one pipeline
SHARED_STEPS = {
    "module_args",
    "build_datamodule",
    "build_trainer",
    "save_last_checkpoint",
    "export_results",
    "all_texts_by_category",
    "write_dataset",
}
"""What ``python -m soft_prompting.train`` and the ``DivergenceTrainer`` façade both do after
building the module: the façade adapts inputs, the steps themselves live once, in the pipeline."""


def pipeline_calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "pipeline"
    }


def names_called(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [node.func for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return {f.id for f in calls if isinstance(f, ast.Name)} | {
        f.attr for f in calls if isinstance(f, ast.Attribute)
    }


@pytest.mark.parametrize("caller", ["train.py", "training/facade.py"])
def test_the_cli_and_the_facade_go_through_the_same_pipeline_steps(caller):
    missing = SHARED_STEPS - pipeline_calls(PACKAGE / caller)
    assert not missing, f"soft_prompting/{caller} does not call pipeline.{sorted(missing)}"


def test_the_facade_repeats_no_step_of_the_pipeline():
    """No second Trainer, checkpoint callback, dataset writer or sampling settings of its own."""
    repeated = names_called(PACKAGE / "training" / "facade.py") & {
        "Trainer",
        "ModelCheckpoint",
        "generate_divergent_dataset",
        "SamplingSettings",
        "build_strategies",
        "build_loggers",
    }
    assert not repeated


# ---------------------------------------------------------------- one safe reader of results
class Exploit:
    def __reduce__(self):
        return (Path("/tmp/soft_prompting_architecture_pwned").touch, ())


def test_analysis_reads_records_through_the_one_safe_reader(tmp_path):
    from soft_prompting.analysis.patterns import load_records
    from soft_prompting.errors import DataError

    run = tmp_path / "run"
    run.mkdir()
    torch.save([{"prompt": Exploit()}], run / "divergent_dataset.pt")  # runs code if unpickled
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_records(run)
    assert not Path("/tmp/soft_prompting_architecture_pwned").exists()
    (run / "other.jsonl").write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="other.jsonl"):
        load_records(run / "other.jsonl")


def test_no_results_reader_unpickles():
    """analysis and report never call torch.load or pickle: run_files reads for them."""
    offenders = [
        f"{path.relative_to(PACKAGE)}: {call}"
        for folder in ("analysis", "report")
        for path in sorted((PACKAGE / folder).glob("*.py"))
        for call in ("torch.load(", "pickle.load")
        if call in path.read_text(encoding="utf-8")
    ]
    assert not offenders
