"""Fingerprints: what a stage's result depends on, and which weights a model folder holds, by content.

A finished stage is redone only when its fingerprint changes: the config sections it depends on (the
`sections` each stage registers, deepalign/plugins.py) and the contents of the local files, model folders and
dataset folders these name. Keys that only say where things are (LOCATIONS: the cache, the outputs) are left
out: the same run with another `DEEPALIGN_CACHE` is the same run. Files are hashed by content (sha256), never
by their times. Each file's digest is remembered in `<cache dir>/digests.json` under its absolute path, size,
modification time and inode: an unchanged file is read once, a re-saved identical one is read again and gives
the same digest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from filelock import FileLock

from deepalign.rundir import write_json_atomic

log = logging.getLogger(__name__)

IGNORED = ("logger", "launcher", "sweep_objective", "stages")  # how a run is carried out and recorded
# keys that only say where things are on disk (a cache, the outputs, a quickstart sub-run's folders): never
# part of a fingerprint, whatever sections a stage names (what is read there is hashed by content where named)
LOCATIONS = ("paths", "model.cache_dir", "quickstart.data_dir", "quickstart.models_dir")
# keys that may name a model folder (weights, tokenizer, adapter): hashed by the contents of its files
MODEL_FOLDERS = (
    "model.path",
    "model.tokenizer",
    "model.adapter_path",
    "analysis.reference",
    "judge.classifier.path",
)
# keys that name a data source `deepalign.data.read_rows` reads: a local folder there is a dataset folder
# (`datasets.load_dataset` reads it), hashed by the contents of every file under it
DATA_SOURCES = (
    "eval.prompts",
    "data.components.*.source",
    "utility.benign",
    "utility.tasks.*.source",
    "probe.chats",
    "quickstart.harmful",
    "quickstart.benign",
    "quickstart.eval_prompts",
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
    """Digests of the local files named under `node`, of the dataset folders (DATA_SOURCES) and of the model
    folders it names (MODEL_FOLDERS, and any folder with a config.json)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _inputs(v, f"{key}.{k}" if key else str(k), out, digests)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _inputs(v, f"{key}.{i}", out, digests)
    elif (path := _local(node)) is not None:
        if path.is_file():
            out[key] = digests.file(path)
        elif path.is_dir() and any(fnmatchcase(key, pattern) for pattern in DATA_SOURCES):
            out[key] = digests.tree(path)
        elif path.is_dir() and (key in MODEL_FOLDERS or (path / "config.json").is_file()):
            # the listed keys, and any other folder holding a saved model (a plugin stage's model paths)
            out[key] = digests.folder(path)


def _gguf_inputs(model: Any, digests: DigestCache) -> dict[str, str]:
    """What turns a model's packaged GGUF file into weights (source=gguf) or tokens (a random model without
    model.tokenizer): the file's digest, and the release that converts it (`models.gguf_converter`)."""
    if not isinstance(model, dict) or not (model.get("gguf_package") and model.get("gguf_file")):
        return {}
    if model.get("source") != "gguf" and not (model.get("source") == "random" and not model.get("tokenizer")):
        return {}
    from deepalign.models import gguf_converter, gguf_path

    try:
        digest = digests.file(gguf_path(model["gguf_package"], model["gguf_file"]))
    except FileNotFoundError:  # not installed: the run fails on it, naming the key
        return {}
    return {"model.gguf": digest, "model.gguf_converter": f"transformers {gguf_converter()}"}


def _select(config: dict[str, Any], sections: Sequence[str] | None) -> dict[str, Any]:
    """`sections` of `config` (all of it less IGNORED when None) as nested dicts, so that inputs are named by
    their full key, less the LOCATIONS keys; a copy."""
    if sections is None:
        chosen = {k: v for k, v in config.items() if k not in IGNORED}
    else:
        chosen = {s: _get(config, s) for s in sections}
    nested: dict[str, Any] = {}
    for name, value in chosen.items():
        *parents, last = name.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = copy.deepcopy(value)
    for dotted in LOCATIONS:
        *parents, last = dotted.split(".")
        node = _get(nested, ".".join(parents)) if parents else nested
        if isinstance(node, dict):
            node.pop(last, None)
    return nested


def config_fingerprint(
    config: dict[str, Any], sections: Sequence[str] | None = None, extra: dict[str, Any] | None = None
) -> str:
    """A hash of `sections` of a resolved config (all of it less IGNORED when None; never the LOCATIONS keys),
    of the contents of the local files, dataset folders and model folders they name, of what converts a GGUF
    model, and of `extra`. Digests are cached in `paths.cache_dir`."""
    chosen = _select(config, sections)
    inputs: dict[str, str] = {}
    with DigestCache(_get(config, "paths.cache_dir")) as digests:
        _inputs(chosen, "", inputs, digests)
        inputs.update(_gguf_inputs(chosen.get("model"), digests))
    blob = {"config": chosen, "inputs": inputs, **(extra or {})}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
