"""Memory of a stretch of work (a stage, the quickstart's harvest): this process's resident-set high-water
mark and, on CUDA, the allocator's peak during the stretch.

    with PeakMemory() as peak:
        ...
    metrics.update(peak.metrics("memory/attack"))  # memory/attack/rss_high_water_gib, .../peak_cuda_gib

`rss_high_water_gib` is the process's resident-memory high-water mark (Linux `VmHWM`) when the stretch ends:
the peak of everything up to and including it, so the stretch where it rises is the one that set it. It is
not reset per stretch: the kernel's reset (`/proc/self/clear_refs`) would also lower what `getrusage`, and so
`/usr/bin/time`, report for the whole process. `peak_cuda_gib` is `torch.cuda.max_memory_allocated` during
the stretch, where CUDA was used; stretches nest (a quickstart's sub-runs inside its stage): resetting CUDA's
peak for an inner stretch first adds what was reached so far to the outer ones. Like the stage times they
describe the machine and the process (rank 0 under a launcher), not the result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path
from typing import ClassVar

import torch

_STATUS = Path("/proc/self/status")


def rss_high_water_kib() -> int | None:
    """This process's resident-set high-water mark (KiB), or None where /proc does not tell it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_kib() -> int | None:
    """This process's resident set now (KiB, Linux `VmRSS`), or None where /proc does not tell it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_memory() -> None:
    """Hand what finished work freed back to the system: a garbage collection, CUDA's cached blocks, and
    glibc's free heap pages (`malloc_trim`; a model's freed activations and caches otherwise stay resident,
    so that each sub-run of a long run starts from a higher floor). A no-op where glibc is absent."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _cuda_used() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class PeakMemory:
    """A context manager measuring the memory of the work inside it (see the module docstring)."""

    _open: ClassVar[list[PeakMemory]] = []  # the stretches entered and not left, outermost first

    def __init__(self) -> None:
        self.rss_kib: int | None = None
        self.cuda_bytes = 0

    @classmethod
    def _fold_cuda(cls) -> None:
        """Adds CUDA's peak since its last reset to every open stretch."""
        if _cuda_used():
            cuda = torch.cuda.max_memory_allocated()
            for stretch in cls._open:
                stretch.cuda_bytes = max(stretch.cuda_bytes, cuda)

    def __enter__(self) -> PeakMemory:
        self._fold_cuda()
        if _cuda_used():
            torch.cuda.reset_peak_memory_stats()
        self._open.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._fold_cuda()
        self._open.remove(self)
        self.rss_kib = rss_high_water_kib()

    def metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix}/rss_high_water_gib` (where /proc tells it) and `{prefix}/peak_cuda_gib` (if CUDA was
        used), GiB to 3 decimals."""
        out: dict[str, float] = {}
        if self.rss_kib is not None:
            out[f"{prefix}/rss_high_water_gib"] = round(self.rss_kib / 2**20, 3)
        if self.cuda_bytes:
            out[f"{prefix}/peak_cuda_gib"] = round(self.cuda_bytes / 2**30, 3)
        return out
