"""Peak memory of a stretch of work (a stage, the quickstart's harvest): this process's resident set and, on
CUDA, the allocator's peak.

    with PeakMemory() as peak:
        ...
    metrics.update(peak.metrics("memory/attack"))  # memory/attack/peak_rss_gib, .../peak_cuda_gib

`peak_rss_gib` is the high-water mark of this process's resident memory (Linux `VmHWM`, reset by writing 5 to
`/proc/self/clear_refs` when a stretch starts); where that reset is refused, no RSS peak is reported rather
than the whole process's. `peak_cuda_gib` is `torch.cuda.max_memory_allocated` on the current device, where
CUDA was used. Stretches nest (a quickstart's sub-runs inside its stage): a reset for an inner stretch first
adds what was reached so far to the outer ones. Like the stage times they describe the machine and the
process (rank 0 under a launcher), not the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SLACK_KIB = 64 * 1024  # memory the process may take between the reset and reading it back


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cuda_used() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class PeakMemory:
    """A context manager measuring the peaks of the work inside it (see the module docstring)."""

    _open: ClassVar[list[PeakMemory]] = []  # the stretches entered and not left, outermost first

    def __init__(self) -> None:
        self.rss_kib: int | None = None  # None: the RSS mark could not be reset
        self.cuda_bytes = 0

    @classmethod
    def _fold(cls) -> None:
        """Adds the peaks reached since the last reset to every open stretch."""
        hwm = _status_kib("VmHWM")
        cuda = torch.cuda.max_memory_allocated() if _cuda_used() else 0
        for stretch in cls._open:
            if stretch.rss_kib is not None and hwm is not None:
                stretch.rss_kib = max(stretch.rss_kib, hwm)
            stretch.cuda_bytes = max(stretch.cuda_bytes, cuda)

    def __enter__(self) -> PeakMemory:
        self._fold()
        if _cuda_used():
            torch.cuda.reset_peak_memory_stats()
        try:
            _CLEAR_REFS.write_text("5")
            hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
            # a kernel that ignored the reset leaves the process's peak, above what it holds now
            if hwm is not None and rss is not None and hwm <= rss + _SLACK_KIB:
                self.rss_kib = hwm
        except OSError:
            pass
        self._open.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._fold()
        self._open.remove(self)

    def metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix}/peak_rss_gib` (if its mark was reset) and `{prefix}/peak_cuda_gib` (if CUDA was used),
        GiB to 3 decimals."""
        out: dict[str, float] = {}
        if self.rss_kib is not None:
            out[f"{prefix}/peak_rss_gib"] = round(self.rss_kib / 2**20, 3)
        if self.cuda_bytes:
            out[f"{prefix}/peak_cuda_gib"] = round(self.cuda_bytes / 2**30, 3)
        return out
