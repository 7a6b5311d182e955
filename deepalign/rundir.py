"""The run directory: resolved config without secrets, environment record, atomic metrics.json."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REDACTED = "***REDACTED***"
_UMASK = os.umask(0)
os.umask(_UMASK)
SECRET_ENV = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD)$", re.IGNORECASE)
SECRET_KEY = re.compile(r"(token|api_key|apikey|secret|password)$", re.IGNORECASE)
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
    """A copy of a plain container with every secret value and every credential-named key blanked."""
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
    return obj


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


def scrub_files(folder: str | Path) -> None:
    """Replace secret values in files already written (Hydra's .hydra/ copies of overrides and config)."""
    secrets = secret_values()
    for path in Path(folder).glob("*.yaml"):
        text = path.read_text()
        clean = redact(text, secrets)
        if clean != text:
            write_text_atomic(path, clean)


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


def environment_record(argv: list[str] | None = None) -> dict[str, Any]:
    """Library versions, interpreter, platform, accelerator, the code's git commit and the command line
    (`argv`, default this process's)."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "git": git_commit(Path(__file__).resolve().parent),
        "argv": redact(sys.argv if argv is None else argv),
    }


class MetricsFile:
    """`metrics.json`: a flat JSON object name -> number, rewritten atomically on every update.

    Non-finite numbers (a diverged loss) are stored as null.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.values: dict[str, float | int | None] = (
            json.loads(self.path.read_text()) if self.path.exists() else {}
        )

    def update(self, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}")
        for name, value in metrics.items():
            self.values[name] = value if math.isfinite(value) else None
        write_json_atomic(self.path, self.values)
