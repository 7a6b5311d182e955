"""The run directory: the environment record (env.json), the finished stages (stages.json), metrics.json and
the lock that keeps a second process out. Files are written and redacted by deepalign/storage."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from deepalign.storage.atomic import write_json_atomic
from deepalign.storage.redaction import redact

log = logging.getLogger(__name__)

TRACKED_PACKAGES = (
    "deepalign", "torch", "transformers", "datasets", "peft", "accelerate", "deepspeed",
    "hydra-core", "omegaconf", "wandb", "gguf", "tokenizers", "safetensors",
)  # fmt: skip


def git_commit(where: Path) -> dict[str, Any]:
    """The commit (and whether the tree is dirty) of the git checkout holding `where`, if any."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        if out.returncode:
            raise RuntimeError(out.stderr.strip())
        return out.stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment_record(argv: list[str] | None = None, config: Any = None) -> dict[str, Any]:
    """Library versions, interpreter, platform, accelerator, the code's git commit and the command line
    (`argv`, default this process's); with a `config` that leaves a precision setting to `auto`, the
    decision (`precision`: bf16 or fp32, why, the CPU probe's numbers; deepalign/precision.py)."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    record = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "git": git_commit(Path(__file__).resolve().parent),
        "argv": redact(sys.argv if argv is None else argv),
    }
    if config is not None:
        from deepalign.models import resolve_device
        from deepalign.precision import bf16_decision, uses_auto

        if uses_auto(config):
            device = resolve_device(config.model.device)
            record["precision"] = bf16_decision(device, config.paths.cache_dir).record()
    return record


class RunDirError(RuntimeError):
    """The run dir cannot be used as it is (in use by another process, a damaged record); says what to do."""


def _read_record(path: Path) -> dict[str, Any]:
    """A JSON object written by an earlier run into the run dir ({} when there is none). ValueError where it
    is damaged; RunDirError where it cannot be read at all (a directory in its place, no permission)."""
    if not path.exists():
        return {}
    if path.is_dir():
        raise RunDirError(
            f"{path} is a directory, not the file the run keeps there: move it out of the run dir and "
            "rerun, or choose another hydra.run.dir"
        )
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RunDirError(f"{path} cannot be read ({err.strerror or err}); fix its permissions") from None
    try:
        data = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged, not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is damaged: not a JSON object")
    return data


def read_stage_state(path: str | Path) -> dict[str, str]:
    """`stages.json`, the finished stages and their fingerprints. A damaged one (only ever written whole, so
    damaged by hand or a copy) is moved aside with a warning and counts as nothing finished: every stage
    runs again and writes its metrics anew, so nothing is lost but time."""
    path = Path(path)
    try:
        return _read_record(path)
    except ValueError as err:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:  # another rank of a launched run moved it first
            return {}
        log.warning("%s; moved to %s, every stage runs again", err, aside.name)
        return {}


class MetricsFile:
    """`metrics.json`: a flat JSON object name -> number, rewritten atomically on every update.

    Non-finite numbers (a diverged loss) are stored as null. A damaged file stops the run (RunDirError): it
    holds the numbers of the stages already finished, which a rerun skips, so it is never replaced silently.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.values: dict[str, float | int | None] = _read_record(self.path)
        except ValueError as err:
            raise RunDirError(
                f"{err}. It holds the metrics of the stages already finished: repair it, or move it aside "
                f"and delete {self.path.with_name('stages.json')} to run every stage again"
            ) from None

    def update(self, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}")
        for name, value in metrics.items():
            self.values[name] = value if math.isfinite(value) else None
        write_json_atomic(self.path, self.values)


LOCK_FILE = ".deepalign.lock"  # an OS lock (flock): released when its process ends, even by a crash


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


@contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir` for this process; a second deepalign process on it fails at once with RunDirError
    naming the holder. Two runs in one run dir would overwrite each other's checkpoints and records."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(str(run_dir / LOCK_FILE), timeout=0), run_dir / f"{LOCK_FILE}.json"
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(
            f"run dir {run_dir} is in use by another deepalign process ({_holder(holder)}); wait for it to "
            "end, or choose another hydra.run.dir"
        ) from None
    try:
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        write_json_atomic(holder, {"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
