"""The run directory: the name of every file a stage writes, atomic writers and safe readers.

Stages talk through these files (train → evaluate → compare → report), so every name lives here
once. A crash, a kill or a full disk never leaves a half-written final file: everything is written
to a temporary file beside the target and renamed over it. Nothing is ever unpickled: ``.pt`` files
are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

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
    """Yield a temporary path beside ``target``; rename it over ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from collaborators
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    """Records of a JSONL file; a torn last line (from a killed writer) is dropped."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise
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
        except Exception as err:
            raise DataError(
                f"{path} is not a plain-data .pt file (refusing to unpickle anything else: "
                f"{str(err).splitlines()[0][:160]}); regenerate it with this project"
            ) from err
    else:
        try:
            records = read_jsonl(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path} is not valid UTF-8 JSON lines: {err}") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path} does not hold a list of records (dicts)")
    return records


def environment() -> dict[str, str]:
    """Library versions and device, written next to every result."""
    import lightning
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine(),
    }
