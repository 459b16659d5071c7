"""The run directory: the name of every file a stage writes, atomic writers and safe readers.

Stages talk through these files (train → evaluate → compare → report), so every name lives here
once. A crash, a kill or a full disk never leaves a half-written final file: everything is written
to a temporary file beside the target and renamed over it. Nothing is ever unpickled: ``.pt`` files
are read with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- train
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = f"{CHECKPOINTS}/last.ckpt"
SOFT_PROMPT = "soft_prompt"
"""The PEFT prompt-tuning adapter folder."""
SOFT_PROMPT_HPARAMS = f"{SOFT_PROMPT}/soft_prompting.json"
METRICS = "metrics.json"
LOGS = "logs"
TRAINING_CURVE = f"{LOGS}/metrics.csv"
DATASET_JSONL = "divergent_dataset.jsonl"
DATASET_PT = "divergent_dataset.pt"
CANDIDATES = "candidates.jsonl"
DATASET_FINGERPRINT = "divergent_dataset.fingerprint.json"
"""What the partial dataset files were made from; partials of other settings are discarded."""
LOCK = ".lock"
"""Held by the run using the directory (see :func:`run_dir_lock`)."""
# ---------------------------------------------------------------------------- evaluate
EVALUATION = "evaluation"
"""The default folder of an evaluation inside a train run."""
EVALUATED_PROMPTS = "evaluated_prompts.jsonl"
RANDOM_TEXTS = "random_texts.jsonl"
"""The ``random_text_cut`` baseline's confirmed records."""
BASELINE_PROMPTS = "baseline_prompts.jsonl"
"""Every selection-matched baseline's confirmed records (``source`` names the baseline)."""
SUMMARY = "summary.json"
EVALUATION_MD = "evaluation.md"
# ---------------------------------------------------------------------------- compare and report
COMPARISON = "comparison.json"
COMPARISON_MD = "comparison.md"
REPORT = "report"


def baseline_stage(baseline: str, stage: str) -> str:
    """The working file of one evaluation baseline's stage (``select`` or ``confirm``)."""
    return f"baseline_{baseline}_{stage}.jsonl"


def partial(name: str) -> str:
    """The append-only partial file beside a final ``.jsonl`` (``x.jsonl`` → ``x.partial.jsonl``)."""
    return name.removesuffix(".jsonl") + ".partial.jsonl"


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temporary path beside ``target``; rename it over ``target`` if the block succeeds.

    A block that fails leaves ``target`` as it was and no temporary file behind; an ``OSError``
    (a full disk, a read-only folder) becomes one :class:`~soft_prompting.errors.RunDirError`
    naming ``target``.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise _write_error(target, err) from err
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from collaborators
        _fsync(tmp)  # the rename must never publish data still in the page cache
        os.replace(tmp, target)
    except OSError as err:
        raise _write_error(target, err) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(target: Path, err: OSError):
    from soft_prompting.errors import RunDirError

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return RunDirError(
            f"no space left on the device while writing {target}: free some space (df -h "
            f"{target.parent}) and run again (ckpt_path=last resumes); files written before are intact"
        )
    return RunDirError(
        f"cannot write {target}: {err.strerror or err}; check the folder's permissions and free "
        "space; files written before are intact"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(target: str | Path, payload) -> Path:
    """Atomically write ``payload`` as indented JSON."""
    return write_text(target, json.dumps(payload, indent=2, default=str) + "\n")


def write_text(target: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_jsonl(target: str | Path, records: Iterable[dict]) -> Path:
    """Atomically write one JSON object a line."""
    with atomic_path(target) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, default=str) + "\n")
    return Path(target)


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file, one JSON object a line.

    A torn last line (a killed writer: no final newline, the start of a JSON object) is dropped
    with a warning; any other line that is not a JSON object is a
    :class:`~soft_prompting.errors.DataError` naming ``FILE:LINE``.
    """
    from soft_prompting.errors import DataError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not a record
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 (byte {err.start}): regenerate the file") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            torn = number == len(lines) and not text.endswith("\n") and line.lstrip()[:1] == "{"
            if torn:
                log.warning("%s:%d is a torn last line (a killed writer); dropped", path, number)
                break
            raise DataError(
                f"{path}:{number} is not a JSON object ({err.msg}): {line[:60]!r}; fix or "
                "delete that line"
            ) from err
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number} is not a JSON object: {line[:60]!r}")
        records.append(record)
    return records


def read_json(path: str | Path):
    """A run-directory JSON file; a :class:`~soft_prompting.errors.DataError` naming it otherwise."""
    from soft_prompting.errors import DataError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise DataError(
            f"{path}{where} is not valid JSON ({err}): a run stopped while writing it or it was "
            "edited; delete it and rerun the stage that writes it"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None


def read_yaml(path: str | Path) -> dict:
    """A run-directory YAML file (``.hydra/config.yaml``) as plain containers, or a DataError."""
    from omegaconf import OmegaConf

    from soft_prompting.errors import DataError

    path = Path(path)
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # yaml and OmegaConf raise many kinds
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise DataError(f"{path} is not a valid YAML config ({first}): fix or delete it") from None


def check_scored(records: list[dict], source: str | Path) -> list[dict]:
    """``records`` if each is a scored divergent-dataset record (a number at
    ``metrics.kl_divergence``); otherwise a DataError naming the first that is not."""
    from soft_prompting.errors import DataError

    for number, record in enumerate(records, start=1):
        kl = (record.get("metrics") or {}).get("kl_divergence")
        if not isinstance(kl, int | float) or isinstance(kl, bool):
            raise DataError(
                f"{source}: record {number} has no number at metrics.kl_divergence, so it is not a "
                "scored divergent-dataset record: point at a run written by soft_prompting.train"
            )
    return records


def write_torch(target: str | Path, payload) -> Path:
    """Atomically ``torch.save`` plain Python data (loadable with ``weights_only=True``)."""
    with atomic_path(target) as tmp:
        torch.save(payload, tmp)
    return Path(target)


def read_records(path: str | Path) -> list[dict]:
    """Records of a ``.jsonl`` or ``.pt`` results file.

    ``.pt`` files are read with ``weights_only=True``: they hold plain types, and a pickle that
    would run code is refused rather than executed.
    """
    from soft_prompting.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if path.suffix == ".pt":
        try:
            records = torch.load(path, weights_only=True)
        except Exception as err:  # torch's own message would advise weights_only=False
            raise DataError(
                f"{path} is not a plain-data .pt file (refusing to unpickle it, {type(err).__name__}:"
                " nothing in it was run): regenerate it with this project"
            ) from err
    else:
        records = read_jsonl(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path} does not hold a list of records (dicts)")
    return records


@contextmanager
def run_dir_lock(run_dir: str | Path):
    """Hold ``run_dir/.lock`` for one run: a second run in the same folder is refused.

    The lock is the operating system's (``flock``), so it goes with the process, even after
    ``kill -9``; the file names the holder's process id for the message.
    """
    from soft_prompting.errors import RunDirError

    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK, "a+", encoding="utf-8")
    except OSError as err:
        raise _write_error(run_dir / LOCK, err) from err
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunDirError(
                f"another run (process {holder}) is using {run_dir}: wait for it to finish, or "
                "choose another hydra.run.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield run_dir
    finally:
        handle.close()  # closing releases the lock


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint of this project, read with ``weights_only=True`` and checked.

    Raises:
        ModelLoadError: the file is missing, is not a plain-data checkpoint (a pickle that would
            run code is refused, never executed), or holds no soft prompt.
    """
    from soft_prompting.errors import ModelLoadError

    path = Path(path)
    fix = "point at a last.ckpt written by soft_prompting.train, or drop the option to start fresh"
    if path.is_dir():
        raise ModelLoadError(
            f"checkpoint {path} is a folder: point at {path / 'last.ckpt'} or {fix}"
        )
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist: {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds; none may end in a traceback
        reason = str(err).split(".")[0].splitlines()[0][:120] if str(err) else type(err).__name__
        raise ModelLoadError(
            f"checkpoint {path} is not a plain-data checkpoint of this project ({reason}); "
            f"nothing in it was run: {fix}"
        ) from None
    prompt = state.get("state_dict", {}).get("soft_prompt") if isinstance(state, dict) else None
    if not isinstance(prompt, torch.Tensor) or prompt.ndim not in (2, 3):
        raise ModelLoadError(
            f"checkpoint {path} holds no soft prompt (state_dict.soft_prompt, a 2-D tensor, or "
            f"3-D for several prompts): {fix}"
        )
    return state


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """Library versions, the device the models ran on and the machine, written next to results.

    Args:
        device: where the models ran; None when the caller does not know: then the device
            ``torch`` uses by default here (the GPU if there is one, else the CPU).
    """
    import lightning
    import transformers

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "device": describe_device(torch.device(device)),
        "architecture": platform.machine(),
    }


def describe_device(device: torch.device) -> str:
    """``"cuda:0 (NVIDIA H100 80GB HBM3)"``, ``"cpu (AMD EPYC 7763 64-Core Processor)"``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({cpu_model_name()})"
    return str(device)


def cpu_model_name() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):  # x86; ARM boards say "Model"
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
