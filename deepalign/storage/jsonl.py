"""JsonlStore: append-only JSONL artifacts keyed by item, so an interrupted stage resumes without redoing
finished items.

Each line is one finished item with a `key`. Lines are appended and flushed batch by batch; on reopening, a
torn or corrupt line (a kill mid-write) is dropped and the file rewritten without it, so it is recomputed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deepalign.storage.atomic import write_text_atomic

log = logging.getLogger(__name__)


class JsonlStore:
    """A JSONL file of records with a unique `key` field; `done` holds the keys already written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        good, bad = [], 0
        for line in self.path.read_text().split("\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record["key"]
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
                continue
            self.records[key] = record
            good.append(line)
        if bad:
            log.warning(
                "%s: dropped %d torn or corrupt line(s); those items will be recomputed", self.path, bad
            )
            write_text_atomic(self.path, "".join(f"{line}\n" for line in good))

    @property
    def done(self) -> set[str]:
        return set(self.records)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Write finished records (each with a `key`) and make them durable before returning."""
        lines = []
        for record in records:
            if "key" not in record:
                raise KeyError("an artifact record needs a 'key'")
            self.records[record["key"]] = record
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    def values(self) -> list[dict[str, Any]]:
        return list(self.records.values())
