"""Fingerprints: what a stage's result depends on, and which weights a model folder holds, by content.

A finished stage is redone only when its fingerprint changes: the config sections it depends on (the
`sections` each stage registers, deepalign/plugins.py) and the contents of the local files and model folders
these name. Files are hashed by content (sha256), never by their times. Each file's digest is remembered
in `<cache dir>/digests.json` under its absolute path, size, modification time and inode: an unchanged file
is read once, a re-saved identical one is read again and gives the same digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from deepalign.rundir import write_json_atomic

log = logging.getLogger(__name__)

IGNORED = ("logger", "launcher", "sweep_objective", "paths", "stages")  # where and how, not what
# keys that may name a model folder (weights, tokenizer, adapter): hashed by the contents of its files
MODEL_FOLDERS = (
    "model.path",
    "model.tokenizer",
    "model.adapter_path",
    "analysis.reference",
    "judge.classifier.path",
)
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


def file_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    with DigestCache(cache_dir) as digests:
        return digests.file(path)


def folder_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    with DigestCache(cache_dir) as digests:
        return digests.folder(path)


def _local(value: Any) -> Path | None:
    """`value` as an existing local path, or None (an ordinary string, a hub id, a long prompt)."""
    if not isinstance(value, str) or not value or len(value) > 4096:
        return None
    try:
        path = Path(value).expanduser()
        return path if path.exists() else None
    except (OSError, RuntimeError, ValueError):  # a name too long, an unknown ~user, a NUL byte
        return None


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _inputs(node: Any, key: str, out: dict[str, str], digests: DigestCache) -> None:
    """Digests of the local files named under `node`, and of the model folders it names (MODEL_FOLDERS, and
    any folder with a config.json)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _inputs(v, f"{key}.{k}" if key else str(k), out, digests)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _inputs(v, f"{key}.{i}", out, digests)
    elif (path := _local(node)) is not None:
        if path.is_file():
            out[key] = digests.file(path)
        elif path.is_dir() and (key in MODEL_FOLDERS or (path / "config.json").is_file()):
            # the listed keys, and any other folder holding a saved model (a plugin stage's model paths)
            out[key] = digests.folder(path)


def _gguf_digest(model: Any, digests: DigestCache) -> str | None:
    """The packaged GGUF file a gguf model (weights) or a random one (tokenizer) comes from, if installed."""
    if not isinstance(model, dict) or model.get("source") not in ("gguf", "random"):
        return None
    if not (model.get("gguf_package") and model.get("gguf_file")):
        return None
    from deepalign.models import gguf_path

    try:
        return digests.file(gguf_path(model["gguf_package"], model["gguf_file"]))
    except FileNotFoundError:
        return None


def config_fingerprint(
    config: dict[str, Any], sections: Sequence[str] | None = None, extra: dict[str, Any] | None = None
) -> str:
    """A hash of `sections` of a resolved config (all of it less IGNORED when None), of the contents of the
    local files and model folders they name, and of `extra`. Digests are cached in `paths.cache_dir`."""
    if sections is None:
        chosen = {k: v for k, v in config.items() if k not in IGNORED}
    else:
        chosen = {s: _get(config, s) for s in sections}
    nested: dict[str, Any] = {}  # dotted keys as nested dicts, so that inputs are named by their full key
    for name, value in chosen.items():
        *parents, last = name.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    inputs: dict[str, str] = {}
    with DigestCache(_get(config, "paths.cache_dir")) as digests:
        _inputs(nested, "", inputs, digests)
        if (gguf := _gguf_digest(nested.get("model"), digests)) is not None:
            inputs["model.gguf"] = gguf
    blob = {"config": chosen, "inputs": inputs, **(extra or {})}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
