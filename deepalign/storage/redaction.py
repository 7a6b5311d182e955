"""Redaction of credentials from everything a run writes: values, logs and the records already on disk.

`redact` replaces the values of credential-named keys and overrides, the user and password of URLs and the
values of credential-named environment variables by REDACTED; `RedactingFilter` and `redact_logs` apply it to
log records, `scrub_file`, `scrub_files` and `scrub_run_dir` to YAML and JSON files already written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from deepalign.storage.atomic import write_json_atomic, write_text_atomic

REDACTED = "***REDACTED***"
SECRET_ENV = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD)$", re.IGNORECASE)
SECRET_KEY = re.compile(r"(token|api_key|apikey|secret|password)$", re.IGNORECASE)
# `+a.b.api_key=VALUE`, `HF_TOKEN=VALUE`: an override or assignment of a credential-named key (at the start of
# the text or after a space, comma, bracket or quote; no spaces around `=`: prose and templates stay)
SECRET_ASSIGNMENT = re.compile(
    r"(?<![^\s,\[('\"])([+~]{0,2}[\w.\-]*(?:token|api_key|apikey|secret|password)=)('[^']*'|\"[^\"]*\"|[^\s,'\"]+)",
    re.IGNORECASE,
)
URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)[^\s/?#@]+(?:@[^\s/?#@]+)*@")  # scheme://user:pw@


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
