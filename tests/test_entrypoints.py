"""What a user sees from the entrypoints: a config error on the command line (a mistyped key, a
bad override, an unknown choice) exits 2 with Hydra's short message, like every other error a user
can fix; each log line is printed once."""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Hydra re-raises instead of printing and exiting when it believes a debugger runs (sys.gettrace).
pytestmark = pytest.mark.skipif(sys.gettrace() is not None, reason="a tracer is active")


def run_main(module: str, args: list[str], monkeypatch, env: dict | None = None) -> BaseException:
    """The entrypoint's ``main()`` as the command line calls it, in this process (fast): what
    it raised."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored (unset) after the test ...
    monkeypatch.delenv("HYDRA_FULL_ERROR")  # ... even when SOFT_PROMPTING_DEBUG sets it
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(BaseException) as raised:
        importlib.import_module(module).main()
    return raised.value


def assert_config_error(code: int | None, stderr: str, fragment: str) -> None:
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert fragment in stderr.splitlines()[0]  # the first line names the problem


@pytest.mark.parametrize(
    "module", ["soft_prompting.train", "soft_prompting.evaluate", "soft_prompting.compare"]
)
def test_a_mistyped_key_exits_2_naming_it(module, monkeypatch, capsys):
    raised = run_main(module, ["training.lerning_rate=0.1"], monkeypatch)
    assert isinstance(raised, SystemExit)
    fragment = "Could not override 'training.lerning_rate'"
    assert_config_error(raised.code, capsys.readouterr().err, fragment)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("training.learning_rate=[1,", "no viable alternative at input"),
        ("model_pair=no_such_pair", "Could not find 'model_pair/no_such_pair'"),
        ("training.learning_rate=fast", "Error merging override training.learning_rate=fast"),
    ],
)
def test_a_bad_override_exits_2(override, fragment, monkeypatch, capsys):
    raised = run_main("soft_prompting.train", [override], monkeypatch)
    assert isinstance(raised, SystemExit)
    err = capsys.readouterr().err
    assert_config_error(raised.code, err, fragment)
    if override.startswith("model_pair="):  # the choices listed are the pairs, and only those
        listed = {
            line.strip() for line in err.split("Available options in 'model_pair':")[1].splitlines()
        }
        pairs = {
            path.stem for path in (Path(__file__).parents[1] / "conf" / "model_pair").glob("*.yaml")
        }
        assert pairs <= listed and "schema" not in listed


def test_the_console_script_exits_2_on_a_mistyped_key(tmp_path):
    """The installed command, in its own process, as a user runs it."""
    script = Path(sys.executable).with_name("soft-prompting-train")
    if not script.exists():
        script = shutil.which("soft-prompting-train")
    if script is None:
        pytest.skip("the package's console scripts are not installed")
    result = subprocess.run(
        [str(script), "lerning_rate=0.1"], cwd=tmp_path, capture_output=True, text=True
    )
    assert_config_error(result.returncode, result.stderr, "Could not override 'lerning_rate'")


@pytest.mark.parametrize("variable", ["SOFT_PROMPTING_DEBUG", "HYDRA_FULL_ERROR"])
def test_the_debug_variables_raise_hydras_error_with_its_traceback(variable, monkeypatch):
    raised = run_main("soft_prompting.train", ["lerning_rate=0.1"], monkeypatch, {variable: "1"})
    assert not isinstance(raised, SystemExit)  # Hydra raised it on, for the traceback
    assert "lerning_rate" in str(raised)


def test_compare_prints_each_lightning_log_line_once(capfd):
    """compare imports Lightning after Hydra set up logging: Lightning's own console handler and
    Hydra's root handler both printed every line."""
    from soft_prompting.compare import lightning_logs_once

    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    saved = [(logger, list(logger.handlers), logger.propagate) for logger in loggers]
    hydra_console = logging.StreamHandler(sys.stdout)  # what Hydra's job logging puts on root
    logging.getLogger().addHandler(hydra_console)
    try:
        for logger in loggers:  # the state Lightning leaves when imported under Hydra's logging
            logger.propagate = True
        loggers[0].addHandler(logging.StreamHandler())
        lightning_logs_once()
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("Seed set to 0")
    finally:
        logging.getLogger().removeHandler(hydra_console)
        for logger, handlers, propagate in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
    out, err = capfd.readouterr()
    assert (out + err).count("Seed set to 0") == 1, out + err
    assert "Seed set to 0" in out  # through Hydra's handler, so also in the job's log file
