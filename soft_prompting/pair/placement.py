"""Where the frozen pair runs, and in which precision: one decision, taken the same way by every
stage (train, the dataset writer, evaluate, compare, the report, the Python façade).

``training.accelerator`` names the device as Lightning does (``auto``, ``cpu``, ``gpu``/``cuda``,
``cuda:N``, ``mps``). ``auto`` is the best device this process can use, in Lightning's own order
(Apple's GPU, else CUDA, else the CPU), so the pair is loaded where the trainer will run the prompt
and is never copied there afterwards. A CUDA device without an index is this process's GPU
(``LOCAL_RANK``, which DDP launchers set per process). Quantised pairs and ``device_map=split``
place themselves on CUDA (:class:`~soft_prompting.pair.loading.ModelPairManager`).

``mixed_precision`` (``auto``, true, false) becomes the autocast dtype of the frozen pair's
forward: ``auto`` is bf16 where the hardware computes it fast (a CUDA GPU with hardware bf16, a CPU
with AMX or an AMD CPU with AVX512-BF16: :func:`cpu_has_native_bf16`) and fp32 elsewhere. The divergence itself always works in fp32 (see
``soft_prompting.maths.divergence``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from soft_prompting.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
"""What ``training.accelerator`` may name (``cuda:N`` too)."""

PROCESS_STARTING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")
"""Lightning strategies that start the ranks from this process after the module is built: a GPU
initialised before would break the fork, so the pair waits on the CPU and each rank places it."""


def resolve_device(
    accelerator: str | torch.device = "auto",
    strategy: str = "auto",
    devices: int = 1,
    key: str = "training.accelerator",
) -> torch.device:
    """The device the frozen pair is loaded on.

    Args:
        accelerator: ``training.accelerator`` (or a ``torch.device``).
        strategy: ``training.strategy``. Under ``fsdp`` the module shards the decoder layers onto
            the ranks itself, so the pair is loaded on the CPU; so it is under the strategies that
            fork or spawn the ranks (:data:`PROCESS_STARTING_STRATEGIES`, and ``auto`` with several
            devices, which Lightning may turn into ``ddp_notebook``).
        devices: ``training.devices``.
        key: the option the errors name (the report's is ``device``).
    """
    if isinstance(accelerator, torch.device):
        return accelerator
    name = str(accelerator).strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ACCELERATORS or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"{key}={accelerator}: use one of {', '.join(ACCELERATORS)} or cuda:N")
    if kind == "auto":
        kind = _best_available()
    if kind == "gpu":
        kind = "cuda" if torch.cuda.is_available() or not _mps_available() else "mps"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{key}={accelerator} but this machine has no CUDA GPU: use {key}=auto or cpu"
        )
    if kind == "mps" and not _mps_available():
        raise ConfigError(
            f"{key}={accelerator} but this machine has no Apple GPU (MPS): use {key}=auto or cpu"
        )
    starts_ranks = strategy in PROCESS_STARTING_STRATEGIES or (strategy == "auto" and devices > 1)
    if kind == "cpu" or strategy == "fsdp" or starts_ranks:
        return torch.device("cpu")
    if kind == "mps":
        return torch.device("mps")
    if index:
        return torch.device("cuda", int(index))
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def _best_available() -> str:
    if _mps_available():
        return "mps"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def cuda_has_bf16(device: torch.device | str | None = None) -> bool:
    """True when the GPU computes bf16 in hardware (Ampere and later); emulated bf16 on older GPUs
    (which newer PyTorch reports as supported) is slower than fp32 and counts as no."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # PyTorch before 2.3 had no emulation and no argument
        return bool(torch.cuda.is_bf16_supported())


def cpu_has_native_bf16() -> bool:
    """True on CPUs where bf16 autocast speeds the step up: AMX (Intel Sapphire Rapids and later,
    as PyTorch or Linux reports it) or AVX512-BF16 on AMD (Zen 4 and later; 2.0-2.4x on the
    training step, docs/PERFORMANCE.md). AVX512-BF16 on an Intel CPU without AMX was measured
    *slower* than fp32 (1.3-1.6x slower matrix products on a Xeon whose AMX the VM hides), and Arm
    is unmeasured: both stay fp32."""
    query = getattr(torch, "cpu", None)
    amx = getattr(query, "_is_amx_tile_supported", None)
    flags, vendor = _cpuinfo()
    if (amx is not None and amx()) or "amx_bf16" in flags:
        return True
    avx512_bf16 = getattr(query, "_is_avx512_bf16_supported", None)
    has_avx512_bf16 = "avx512_bf16" in flags or (avx512_bf16 is not None and avx512_bf16())
    return vendor == "AuthenticAMD" and has_avx512_bf16


def _cpuinfo() -> tuple[set[str], str]:
    return _read_cpuinfo(Path("/proc/cpuinfo"))


def _read_cpuinfo(path: Path) -> tuple[set[str], str]:
    """The CPU feature flags Linux lists (``flags`` on x86, ``Features`` on Arm) and the vendor
    (``vendor_id``); empty elsewhere."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return set(), ""
    flags: set[str] = set()
    vendor = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
        elif key.strip() == "vendor_id":
            vendor = value.strip()
    return flags, vendor


def autocast_dtype(mixed_precision: bool | str, device: torch.device | str) -> torch.dtype | None:
    """The dtype the frozen pair's forward autocasts to on ``device``, or None for fp32.

    Args:
        mixed_precision: ``training.mixed_precision``: ``auto`` (bf16 where the hardware has it:
            :func:`cuda_has_bf16`, :func:`cpu_has_native_bf16`; fp32 elsewhere), True (bf16, or
            fp16 on a GPU without bf16) or False (fp32).
        device: where the pair runs.
    """
    if mixed_precision is False:
        return None
    kind = torch.device(device).type
    if mixed_precision == "auto":
        if kind == "cuda":
            return torch.bfloat16 if cuda_has_bf16(device) else None
        if kind == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        return None  # mps and others: fp32 unless asked
    if mixed_precision is True:
        if kind == "cuda" and not cuda_has_bf16(device):
            return torch.float16
        return torch.bfloat16
    raise ConfigError(f"training.mixed_precision={mixed_precision!r}: use auto, true or false")


def lightning_precision(mixed_precision: bool | str, device: torch.device | str) -> str:
    """Lightning's ``precision`` argument for :func:`autocast_dtype`."""
    dtype = autocast_dtype(mixed_precision, device)
    return {None: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[dtype]
