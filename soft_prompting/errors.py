"""User-facing errors and how the command-line entrypoints report them.

Every error a user can cause (a bad config value, a missing file, a model that cannot be loaded, a
divergence that blew up) is a :class:`SoftPromptingError` whose message names the problem and the
fix. Entrypoints wrap their work in :func:`reported_errors`, which prints that message in one or two
lines and exits with status 2 instead of a traceback wall; ``SOFT_PROMPTING_DEBUG=1`` (or Hydra's
``HYDRA_FULL_ERROR=1``) shows the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any


class SoftPromptingError(Exception):
    """Base of the errors a user can fix; the message says how."""


class ConfigError(SoftPromptingError, ValueError):
    """A config value that is missing, of the wrong type or out of range."""


class DataError(SoftPromptingError, ValueError):
    """Category texts or a prompts file that cannot be used."""


class ModelLoadError(SoftPromptingError, RuntimeError):
    """A model, tokenizer, checkpoint or pair that cannot be used."""


class RunDirError(SoftPromptingError, FileExistsError):
    """A run directory that already holds results."""


class DivergenceError(SoftPromptingError, FloatingPointError):
    """The divergence became NaN or infinite."""


class Interrupted(SoftPromptingError):
    """A run stopped by a signal (SIGTERM, SIGINT, SLURM's SIGUSR1); the message says how to resume."""


def exit_2_on_config_errors(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``hydra.main`` entrypoint so that a config error exits with status 2, as every other
    error a user can fix does, instead of Hydra's 1.

    Hydra prints its own one-line message (a mistyped key, a bad override, an unknown config
    choice) and exits 1 from inside its ``except`` block, so the exception is the ``SystemExit``'s
    context. ``SOFT_PROMPTING_DEBUG=1`` turns on ``HYDRA_FULL_ERROR`` for Hydra's traceback.
    """
    from hydra.errors import ConfigCompositionException, OverrideParseException

    @functools.wraps(hydra_main)
    def main(*args: Any, **kwargs: Any) -> Any:
        if debug_enabled():
            os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        try:
            return hydra_main(*args, **kwargs)
        except SystemExit as stop:
            config_error = (ConfigCompositionException, OverrideParseException)
            if stop.code == 1 and isinstance(stop.__context__, config_error):
                raise SystemExit(2) from None
            raise

    return main


def debug_enabled() -> bool:
    return any(os.environ.get(name, "0") not in ("", "0") for name in _DEBUG_VARIABLES)


_DEBUG_VARIABLES = ("SOFT_PROMPTING_DEBUG", "HYDRA_FULL_ERROR")


@contextmanager
def reported_errors(exit_on_error: bool = True):
    """Turn a :class:`SoftPromptingError` into a short message on stderr and exit status 2.

    Args:
        exit_on_error: False inside a Hydra multirun: the message is printed and the error raised
            on, so the sweeper records this job as failed and runs the others (Optuna counts it
            against ``hydra.sweeper.max_failure_rate``) instead of the whole sweep exiting.
    """
    try:
        yield
    except SoftPromptingError as err:
        if debug_enabled():
            raise
        print(f"error: {err}", file=sys.stderr)
        # A signal stops the whole process (a sweep's later jobs too): the scheduler asked for it.
        if not exit_on_error and not isinstance(err, Interrupted):
            raise
        print("(set SOFT_PROMPTING_DEBUG=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)
