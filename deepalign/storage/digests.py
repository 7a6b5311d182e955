"""Content digests: the sha256 of files, model folders and dataset folders, never their times.

Each file's digest is remembered in `<cache dir>/digests.json` under its absolute path, size, modification
time and inode: an unchanged file is read once, a re-saved identical one is read again and gives the same
digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from filelock import FileLock

from deepalign.storage.atomic import write_json_atomic

log = logging.getLogger(__name__)

SKIPPED_FILES = ("deepalign-source.json",)  # our own notes in a converted model folder (not the weights)
_memo: dict[str, list] = {}  # this process's digests, as in digests.json


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


class DigestCache:
    """sha256 of files, remembered per (absolute path, size, mtime_ns, inode) in `<cache_dir>/digests.json`
    (`cache_dir` None: in this process only). Use as a context manager: new digests are saved on exit."""

    def __init__(self, cache_dir: str | Path | None) -> None:
        self.path = None if cache_dir is None else Path(os.path.expanduser(str(cache_dir))) / "digests.json"
        self.new: dict[str, list] = {}

    def __enter__(self) -> DigestCache:
        if self.path is not None:
            _memo.update(self._read())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.new and self.path is not None:
            try:
                self._save()
            except OSError as err:  # a read-only cache only costs hashing again next time
                log.warning("could not save file digests to %s: %s", self.path, err)

    def _read(self) -> dict[str, list]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            entries = {**self._read(), **self.new}
            write_json_atomic(self.path, {k: v for k, v in entries.items() if Path(k).exists()})

    def file(self, path: str | Path) -> str:
        """The sha256 of a file's bytes (read only when its size, time or inode changed)."""
        path = Path(path).resolve()
        key, stamp = str(path), _stamp(path)
        entry = _memo.get(key)
        if isinstance(entry, list) and entry[:3] == stamp:
            return entry[3]
        digest = _sha256(path)
        if _stamp(path) == stamp:  # not rewritten while being read
            _memo[key] = self.new[key] = [*stamp, digest]
        return digest

    def folder(self, path: str | Path) -> str:
        """A digest of a model folder: the names and contents of its top-level files (what `from_pretrained`
        reads; hidden files and subfolders such as checkpoints are left out)."""
        h = hashlib.sha256()
        for f in sorted(Path(path).iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name not in SKIPPED_FILES:
                h.update(f"{f.name}:{self.file(f)}\n".encode())
        return h.hexdigest()

    def tree(self, path: str | Path) -> str:
        """A digest of a dataset folder: the relative paths and contents of every file under it, in every
        subfolder (`datasets` reads `data/`, `train/`, ...); hidden files and folders are left out."""
        root = Path(path)
        h = hashlib.sha256()
        for f in sorted(root.rglob("*")):
            relative = f.relative_to(root)
            if f.is_file() and not any(part.startswith(".") for part in relative.parts):
                h.update(f"{relative.as_posix()}:{self.file(f)}\n".encode())
        return h.hexdigest()


def file_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    with DigestCache(cache_dir) as digests:
        return digests.file(path)


def folder_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    with DigestCache(cache_dir) as digests:
        return digests.folder(path)
