"""The OpenAI-compatible chat-completions client shared by the judges that ask a judge model (rubric,
StrongREJECT): retries with backoff, a disk cache of parsed replies, parallel requests.

A subclass of `ApiJudge` says what to ask (`prompt`), how to read the reply (`parse`, ValueError when it is
malformed), which cached entries are usable (`valid`) and what a reply means (`verdict`).
"""

from __future__ import annotations

import email.utils
import hashlib
import importlib.util
import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepalign.errors import ConfigError
from deepalign.judges.base import EMPTY_RULE, JudgeBase, JudgeItem, Judgment, judged_text
from deepalign.storage.atomic import write_text_atomic

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 1.0  # retry k (0-based) waits about BACKOFF_BASE_S * 2**k, jittered, at most BACKOFF_MAX_S
BACKOFF_MAX_S = 60.0
RETRY_AFTER_MAX_S = 300.0  # a server's Retry-After is honoured up to this long


@dataclass
class ApiJudgeConfig:
    """The settings of a judge that asks an OpenAI-compatible chat API."""

    base_url: str | None = None  # None: the API's default
    model: str = "gpt-4o-2024-08-06"
    api_key_env: str = "OPENAI_API_KEY"  # the name of the variable, never the key itself
    concurrency: int = 8
    max_retries: int = 6
    timeout_s: float = 60.0
    show_prefill: bool = True

    def check(self, key: str) -> None:
        """Raise ConfigError naming `key` when the judge cannot work: no openai package, no model, no key in
        the environment, a bad number. Nothing is requested."""
        if importlib.util.find_spec("openai") is None:
            raise ConfigError(f"{key}: an API judge needs the openai package: pip install deepalign[judge]")
        if not self.model:
            raise ConfigError(f"{key}.model: empty; name the judge model (e.g. gpt-4o-2024-08-06)")
        if not self.api_key_env:
            raise ConfigError(f"{key}.api_key_env: empty; name the environment variable holding the key")
        if not os.environ.get(self.api_key_env):
            raise ConfigError(f"{key}.api_key_env: the environment variable {self.api_key_env} is not set")
        if self.concurrency < 1:
            raise ConfigError(f"{key}.concurrency: must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ConfigError(f"{key}.max_retries: must be >= 0, got {self.max_retries}")
        if not self.timeout_s > 0:
            raise ConfigError(f"{key}.timeout_s: must be > 0, got {self.timeout_s}")


def backoff_delay(attempt: int, base_s: float = BACKOFF_BASE_S, max_s: float = BACKOFF_MAX_S) -> float:
    """Exponential backoff with jitter: base * 2**attempt, capped, times a uniform factor in [0.5, 1]."""
    return min(max_s, base_s * 2**attempt) * random.uniform(0.5, 1.0)


def retry_after_seconds(headers: Any) -> float | None:
    """The wait a response asks for (`retry-after-ms`, `retry-after` in seconds or as an HTTP date)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / scale)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, email.utils.mktime_tz(email.utils.parsedate_tz(value)) - time.time())
        except (TypeError, ValueError, OverflowError):
            return None
    return None


class _GiveUp(Exception):
    """Judging one item failed for good; the message says why."""


class ApiJudge(JudgeBase):
    """A judge that asks a judge model through an OpenAI-compatible chat-completions API.

    Each item is one request (temperature 0) with `prompt(instruction, judged text)` as the user message
    (after `system_prompt` as the system message, when a subclass sets one), the judged text being
    `prefill + response` with `show_prefill`. Retries, up to `max_retries` after the first attempt, with
    exponential backoff and jitter (`backoff_base_s`), or the server's `Retry-After` when it gives one: HTTP
    429, 408 and 5xx, timeouts, connection errors, and malformed replies (`parse` raises ValueError). Other
    4xx errors (a bad key, an unknown model) fail the item at once. An item that fails for good gets
    `harmful=None` and `error`; the other items are unaffected. `concurrency` requests run in parallel
    threads; identical (instruction, text) pairs are asked once.

    Parsed replies are cached under `cache_dir/judge/<cache_folder>/<sha256>.json`, keyed by the judge's
    `cache_version`, the model, `prompt_version`, the instruction and the judged text; a cached item makes
    no request. Failures are not cached. The API key is read from the environment variable `api_key_env`
    and is never logged, cached, or put into an error message.
    """

    cache_folder: str  # the cache's folder under cache_dir/judge/, and the first part of the version
    prompt_version: str  # change it whenever the prompt or the parsing changes: it keys the cache
    max_tokens: int = 512
    system_prompt: str | None = None  # a system message before the prompt (StrongREJECT's published one)

    def __init__(
        self,
        name: str,
        cfg: ApiJudgeConfig,
        *,
        cache_dir: str | Path | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ):
        cfg.check(f"judge.{name}")
        if cache_dir is None:
            raise ValueError(f"judge.{name}: an API judge needs a cache_dir for its replies")
        import openai

        self.name, self.cfg = name, cfg
        self.cache_version = f"{self.cache_folder}:{self.prompt_version}:{cfg.model}"
        self.version = f"{self.cache_version}:{EMPTY_RULE}"
        self.cache_dir = Path(cache_dir).expanduser() / "judge" / self.cache_folder
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.requests = 0  # API calls made by this judge (attempts, retries included)
        self._lock = threading.Lock()
        self._client = openai.OpenAI(
            base_url=cfg.base_url,
            api_key=os.environ[cfg.api_key_env],
            max_retries=0,
            timeout=cfg.timeout_s,
        )

    # -------------------------------------------------------------- what a subclass says

    def prompt(self, instruction: str, text: str) -> str:
        """The request's single user message."""
        raise NotImplementedError

    def parse(self, reply: str) -> dict[str, Any]:
        """The fields to cache from a reply (JSON-serialisable); ValueError when the reply is malformed."""
        raise NotImplementedError

    def valid(self, entry: dict[str, Any]) -> bool:
        """Whether a cache entry read from disk holds usable fields (may raise KeyError/TypeError: no)."""
        raise NotImplementedError

    def verdict(self, entry: dict[str, Any]) -> tuple[bool, float, str | None]:
        """(harmful, score, detail) from a cache entry."""
        raise NotImplementedError

    # -------------------------------------------------------------- cache

    def cache_key(self, instruction: str, text: str) -> str:
        material = [self.cache_version, self.cfg.model, self.prompt_version, instruction, text]
        return hashlib.sha256(json.dumps(material, ensure_ascii=False).encode()).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.json"

    def _cache_get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(self._cache_path(key).read_text())
            return entry if self.valid(entry) else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # absent or unreadable: ask again

    def _cache_put(self, key: str, entry: dict[str, Any]) -> None:
        try:
            write_text_atomic(self._cache_path(key), json.dumps(entry, ensure_ascii=False, indent=1) + "\n")
        except OSError as err:  # a full or read-only disk costs the cache, not the result
            log.warning(
                "%s judge: could not write the cache file %s: %s", self.name, self._cache_path(key), err
            )

    # -------------------------------------------------------------- requests

    def _redact(self, message: str) -> str:
        key = os.environ.get(self.cfg.api_key_env)
        return message.replace(key, "***") if key else message

    def _describe(self, err: BaseException) -> str:
        return self._redact(f"{type(err).__name__}: {err}")[:500]

    def _retry_wait(self, err: BaseException, attempt: int) -> float | None:
        """Seconds to wait before retrying after `err`, or None when it is not worth retrying."""
        import openai

        backoff = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s)
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            if status == 429 or status == 408 or status >= 500:
                wait = retry_after_seconds(getattr(err.response, "headers", None))
                return backoff if wait is None else min(wait, RETRY_AFTER_MAX_S)
            return None
        if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
            return backoff
        return None

    def _pause(self, attempt: int, attempts: int, problem: str, wait: float) -> None:
        """Say why a try failed, then wait before the next one."""
        log.warning(
            "%s judge: try %d/%d: %s; again in %.1fs", self.name, attempt + 1, attempts, problem, wait
        )
        time.sleep(wait)

    def _request(self, instruction: str, text: str) -> tuple[dict[str, Any], str, str | None]:
        """(parsed fields, raw reply, model that answered) for one item, with retries; raises _GiveUp."""
        attempts = self.cfg.max_retries + 1
        last = "no attempt"
        for attempt in range(attempts):
            try:
                with self._lock:
                    self.requests += 1
                system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
                response = self._client.chat.completions.create(
                    model=self.cfg.model,
                    messages=[*system, {"role": "user", "content": self.prompt(instruction, text)}],
                    temperature=0,
                    max_tokens=self.max_tokens,
                )
            except Exception as err:  # openai's errors, or anything else that must not sink the batch
                last = self._describe(err)
                wait = self._retry_wait(err, attempt)
                if wait is None:
                    raise _GiveUp(last) from None
                if attempt + 1 < attempts:
                    self._pause(attempt, attempts, last, wait)
                continue
            content = response.choices[0].message.content if response.choices else None
            try:
                fields = self.parse(content or "")
            except ValueError as err:
                last = f"malformed reply: {err}"
                if attempt + 1 < attempts:
                    wait = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s)
                    self._pause(attempt, attempts, last, wait)
                continue
            return fields, content or "", getattr(response, "model", None)
        raise _GiveUp(f"gave up after {attempts} attempts; last: {last}")

    def _judge_key(self, key: str, instruction: str, text: str) -> tuple[dict[str, Any] | None, str | None]:
        """(cache entry, error) for one distinct (instruction, text)."""
        entry = self._cache_get(key)
        if entry is not None:
            return entry, None
        try:
            fields, reply, answered_by = self._request(instruction, text)
        except _GiveUp as err:
            return None, str(err)
        except Exception as err:  # a bug must not lose the other items' results
            return None, self._describe(err)
        entry = {
            "judge": self.cache_version,
            "model": self.cfg.model,
            f"{self.cache_folder}_version": self.prompt_version,
            "answered_by": answered_by,
            **fields,
            "reply": reply,
        }
        self._cache_put(key, entry)
        return entry, None

    def _judge(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        show = self.cfg.show_prefill
        inputs = [(item.prompt, judged_text(item, show)) for item in items]
        keys = [self.cache_key(*pair) for pair in inputs]
        distinct = dict(zip(keys, inputs))  # identical (instruction, text) pairs are judged once
        results: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
        if distinct:
            workers = max(1, min(self.cfg.concurrency, len(distinct)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{self.name}-judge") as pool:
                futures = {k: pool.submit(self._judge_key, k, *pair) for k, pair in distinct.items()}
                results = {k: f.result() for k, f in futures.items()}
        out = []
        for item, key in zip(items, keys):
            entry, error = results[key]
            common = {"id": item.id, "judge": self.name, "version": self.version, "shown_prefill": show}
            if entry is None:
                out.append(Judgment(**common, harmful=None, score=None, error=error))
            else:
                harmful, score, detail = self.verdict(entry)
                out.append(Judgment(**common, harmful=harmful, score=score, detail=detail))
        failed = sum(j.harmful is None for j in out)
        if failed:
            log.warning(
                "%s judge: %d of %d items failed (first error: %s)",
                self.name,
                failed,
                len(out),
                next(j.error for j in out if j.harmful is None),
            )
        return out
