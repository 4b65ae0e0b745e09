"""The compute a user asks for, checked against this machine BEFORE any work starts.

``--device cuda:7`` on a CPU-only box, ``--threads 100000`` or ``--num-cpus 1000`` used to start
work (or crash deep inside torch or Ray); these checks refuse them with a typed error naming the
option and what this machine has.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pft.core.errors import ResourceError

__all__ = ["check_cache_root", "check_cpu_count", "check_torch_device", "cpu_cores"]


def cpu_cores() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def check_cpu_count(value: object, option: str = "--threads") -> int:
    """``value`` as an integer in ``[1, cpu_cores()]``.

    Raises
    ------
    ResourceError
        Not an integer, below 1, or more than this machine's cores.
    """
    cores = cpu_cores()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cores:
        raise ResourceError(
            f"{option} must be an integer in [1, {cores}] (this machine's cores), got {value!r}"
        )
    return value


def check_torch_device(name: str, option: str = "--device") -> torch.device:
    """The torch device ``name`` names, if this machine has it.

    Raises
    ------
    ResourceError
        Not a device name, CUDA/MPS not available here, or a CUDA index beyond the GPUs present.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ResourceError(f"{option} {name!r} is not a torch device name (e.g. cpu, cuda, cuda:0)") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ResourceError(f"{option} {name}: this machine has no CUDA GPU (torch sees none); use cpu")
        if device.index is not None and device.index >= count:
            raise ResourceError(
                f"{option} {name}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ResourceError(f"{option} {name}: MPS is not available on this machine; use cpu")
    elif device.type != "cpu":
        raise ResourceError(f"{option} {name}: only cpu, cuda and mps devices are supported")
    return device


def check_cache_root(path: Path, option: str = "--cache-dir") -> Path:
    """A cache root that is a folder, or can become one (nothing is created here).

    Raises
    ------
    ResourceError
        ``path`` (or a parent of it) is a file, or the folder it would be made in is not writable.
    """
    path = Path(path).expanduser()
    for part in (path, *path.parents):
        if not part.exists():
            continue
        if not part.is_dir():
            what = "is" if part == path else f"is inside {part}, which is"
            raise ResourceError(f"{option} {path} {what} a file, not a folder")
        if not os.access(part, os.W_OK | os.X_OK):
            raise ResourceError(f"{option} {path}: {part} is not writable")
        break
    return path
