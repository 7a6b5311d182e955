"""The run directory: resolved config without secrets, environment record, atomic metrics.json."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

REDACTED = "***REDACTED***"
_UMASK = os.umask(0)
os.umask(_UMASK)
SECRET_ENV = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD)$", re.IGNORECASE)
SECRET_KEY = re.compile(r"(token|api_key|apikey|secret|password)$", re.IGNORECASE)
# `+a.b.api_key=VALUE`, `HF_TOKEN=VALUE`: an override or assignment of a credential-named key (at the start of
# the text or after a space, comma, bracket or quote; no spaces around `=`: prose and templates stay)
SECRET_ASSIGNMENT = re.compile(
    r"(?<![^\s,\[('\"])([+~]{0,2}[\w.\-]*(?:token|api_key|apikey|secret|password)=)('[^']*'|\"[^\"]*\"|[^\s,'\"]+)",
    re.IGNORECASE,
)
URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)[^\s/?#@]+(?:@[^\s/?#@]+)*@")  # scheme://user:pw@
TRACKED_PACKAGES = (
    "deepalign", "torch", "transformers", "datasets", "peft", "accelerate", "deepspeed",
    "hydra-core", "omegaconf", "wandb", "gguf", "tokenizers", "safetensors",
)  # fmt: skip


def secret_values() -> list[str]:
    """Values of environment variables that look like credentials (HF_TOKEN, OPENAI_API_KEY, ...)."""
    return sorted(
        {v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 6}, key=len, reverse=True
    )


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a plain container (or a string) without credentials: the values of credential-named keys,
    of credential-named overrides (`+judge.rubric.api_key=...`), the user and password of URLs
    (`scheme://user:pw@host`) and the values of credential-named environment variables (`secrets`, default
    `secret_values()`) are replaced by REDACTED. The one redaction of everything a run writes."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {
            k: REDACTED if (SECRET_KEY.search(str(k)) and v is not None) else redact(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, REDACTED)
        obj = SECRET_ASSIGNMENT.sub(lambda m: m.group(1) + REDACTED, obj)
        obj = URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", obj)
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every message (and traceback) before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def redact_logs() -> None:
    """Redact what every handler of the root logger writes (the run's deepalign.log, the console)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide run dirs from teammates
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def scrub_file(path: str | Path, secrets: list[str] | None = None) -> None:
    """Redact a YAML or JSON file already written (by key, override, URL and secret value), in place; a
    file without secrets is left untouched, one that does not parse is redacted as text."""
    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        data = text
    clean = redact(data, secrets)
    if clean == data:
        return
    if isinstance(data, str):
        write_text_atomic(path, clean)
    elif path.suffix == ".json":
        write_json_atomic(path, clean)
    else:
        write_text_atomic(path, yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))


def scrub_files(folder: str | Path) -> None:
    """Redact the YAML files of a folder (Hydra's .hydra/ copies of the overrides and the config)."""
    secrets = secret_values()
    for path in Path(folder).glob("*.yaml"):
        scrub_file(path, secrets)


def scrub_run_dir(run_dir: str | Path, sweep_dir: str | Path | None = None) -> None:
    """Redact every record a run dir holds (config.yaml, env.json, launch.json, .hydra/) and a sweep's
    multirun.yaml: called on every way out of a run, also when it failed before writing its own records."""
    run_dir, secrets = Path(run_dir), secret_values()
    for name in ("config.yaml", "env.json", "launch.json"):
        scrub_file(run_dir / name, secrets)
    for path in (run_dir / ".hydra").glob("*.yaml"):
        scrub_file(path, secrets)
    if sweep_dir is not None:
        scrub_file(Path(sweep_dir) / "multirun.yaml", secrets)


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
