"""How much memory a computation takes and how much is free, on a GPU or a Linux CPU.

The runner sizes its packs with these (``leakbench.running.worker``): a probe's peak bytes (the CUDA
allocator's peak, or on a CPU the process's peak resident set through ``/proc``) against
the free memory (``torch.cuda.mem_get_info``, or ``MemAvailable`` under any cgroup v2
limits). Where memory cannot be measured, ``NotMeasured`` says why; the caller then falls
back to a fixed pack size.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from pathlib import Path
from typing import Callable

import torch

# Linux interfaces of the CPU measurement (module constants: tests point them elsewhere)
_PROC_STATUS = "/proc/self/status"  # VmRSS, VmHWM (peak resident set), RssFile
_CLEAR_REFS = "/proc/self/clear_refs"  # writing "5" resets VmHWM to the current VmRSS
_MEMINFO = "/proc/meminfo"
_PROC_CGROUP = "/proc/self/cgroup"
_CGROUP_ROOT = "/sys/fs/cgroup"


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes ``run()`` takes above what is in use before it, on ``device``; ``NotMeasured`` where unknown."""
    if device.type == "cpu":
        return _cpu_peak_bytes(run)
    if device.type != "cuda":
        raise NotMeasured(f"no memory measurement on a {device.type} device")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return max(1, torch.cuda.max_memory_allocated(device) - base)


class NotMeasured(Exception):
    """Memory cannot be measured here (no /proc, a file not writable, another device); says why."""


def is_oom(err: BaseException) -> bool:
    """Out of memory: CUDA's, PyTorch's CPU allocator failing (``DefaultCPUAllocator: can't allocate
    memory``), or Python's ``MemoryError``."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    message = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def first_line(err: BaseException) -> str:
    """The message's first line, or the error's type where it has none (``MemoryError()``)."""
    lines = str(err).splitlines()
    return lines[0] if lines else type(err).__name__


def release(device: torch.device) -> None:
    """Hand memory the allocator keeps cached back: CUDA's cache, or the CPU heap."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _release_cpu_heap()


def _cpu_peak_bytes(run: Callable[[], object]) -> int:
    """Peak resident bytes of ``run()`` above the resident set before it (Linux: VmHWM reset through
    ``/proc/self/clear_refs``). Freed heap goes back to the system first, so the baseline is honest."""
    _release_cpu_heap()
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError as err:
        raise NotMeasured(f"cannot reset the peak resident set ({_CLEAR_REFS}: {err.strerror or err})") from None
    status = _proc_kib(_PROC_STATUS, "VmRSS", "VmHWM", "RssFile")
    base = status["VmRSS"] * 1024
    if status["VmHWM"] - status["VmRSS"] > 64 * 1024:  # the reset set VmHWM to VmRSS: it did not take
        raise NotMeasured(f"writing {_CLEAR_REFS} did not reset VmHWM")
    run()
    after = _proc_kib(_PROC_STATUS, "VmHWM", "RssFile")
    _release_cpu_heap()  # the probe's freed heap is free memory again for free_cpu_bytes
    # code and data files mapped for the first time (a first probe loads kernels and libraries) stay
    # resident once and for all; they are not what each packed reconstruction costs
    loaded = max(0, after["RssFile"] - status["RssFile"]) * 1024
    return max(1, after["VmHWM"] * 1024 - base - loaded)


def free_bytes(device: torch.device) -> int:
    """Bytes ``device`` can still give: the CUDA allocator's cache is emptied first, so what it keeps counts as free."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        raise NotMeasured(f"no memory measurement on a {device.type} device")
    return free_cpu_bytes()


def free_cpu_bytes() -> int:
    """Bytes the system can still give this process: ``MemAvailable``, and under cgroup v2 memory limits
    (the process's cgroup and its ancestors) at most each limit less that cgroup's usage, not counting
    its inactive page cache, which the kernel reclaims before it runs out. ``NotMeasured`` off Linux."""
    free = _proc_kib(_MEMINFO, "MemAvailable")["MemAvailable"] * 1024
    for group in _cgroup_v2_dirs():
        try:
            limit = (group / "memory.max").read_text().strip()
            if limit == "max":
                continue
            free = min(free, int(limit) - int((group / "memory.current").read_text()) + _inactive_file(group))
        except (OSError, ValueError):
            continue  # no limit at this level (or not readable)
    return max(0, free)


def _inactive_file(group: Path) -> int:
    try:
        lines = (group / "memory.stat").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("inactive_file ")), 0)


def _cgroup_v2_dirs() -> list[Path]:
    """The process's cgroup v2 directory and its ancestors up to the mount root (none without cgroup v2)."""
    try:
        with open(_PROC_CGROUP) as f:
            relative = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    except OSError:
        return []
    if relative is None:
        return []
    group = Path(_CGROUP_ROOT, relative.lstrip("/"))
    return [group, *group.parents[:len(group.relative_to(_CGROUP_ROOT).parts)]]


def _proc_kib(path: str, *fields: str) -> dict[str, int]:
    """``Field:   123 kB`` lines of a /proc file, in KiB; ``NotMeasured`` if the file or a field is missing."""
    try:
        with open(path) as f:
            values = {name: rest.split()[0] for name, _, rest in (line.partition(":") for line in f)
                      if name in fields}
        return {name: int(values[name]) for name in fields}
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise NotMeasured(f"cannot read {', '.join(fields)} from {path} ({type(err).__name__})") from None


def _release_cpu_heap() -> None:
    """Collect garbage and hand freed heap back to the system (glibc's ``malloc_trim``, where there is one)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None
