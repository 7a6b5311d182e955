"""Helpers shared by the benchmark scripts: peak-RSS measurement, child processes, markdown tables.

Peak memory is the kernel's high-water mark of the resident set (VmHWM in /proc/self/status, the same number
as getrusage's ru_maxrss), which sees torch's allocations (tracemalloc does not). Each measured variant runs
in a fresh child process, so every peak starts from the same state; `reset_peak` (writing 5 to
/proc/self/clear_refs, Linux >= 4.0) lets a child measure the peak of one phase, e.g. after its model loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float:
    """The resident set size now, in MiB."""
    kib = _status_kib("VmRSS")
    if kib is None:
        import psutil

        return psutil.Process().memory_info().rss / MIB
    return kib / 1024


def peak_rss_mib() -> float:
    """The resident set's high-water mark since the process started (or since `reset_peak`), in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def set_threads(threads: int) -> None:
    """Use `threads` CPU threads in torch's intra-op pool (and in the OpenMP/MKL pools of children).

    On a machine shared with other jobs, one thread per process is much faster than two: with two, every
    parallel op waits at a barrier for a thread the scheduler has parked (44 s vs 7 s per training step of
    the demo model measured here, while another job kept one core busy)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def page_in(*models: Any) -> None:
    """Read every parameter once: weights loaded from a memory-mapped file enter the resident set only when
    first touched, which would otherwise count toward the first measured phase."""
    import torch

    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                p.sum()


def run_child(
    script: Path,
    args: Sequence[str],
    threads: int,
    env_extra: dict[str, str] | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Run `python script --child-out FILE *args` in a fresh process; return the JSON it wrote to FILE."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--child-out", str(out), f"--threads={threads}", *args]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        env.update(env_extra or {})
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def write_child_result(path: str, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--threads, and the hidden --child-out of the child processes."""
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per process (default 1: see set_threads)"
    )
    parser.add_argument("--child-out", help=argparse.SUPPRESS)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats keep what the caller formatted (pass strings for fixed digits)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """One line saying where the numbers come from."""
    import platform

    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
