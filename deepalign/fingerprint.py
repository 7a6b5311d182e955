"""Fingerprints of a resolved config: what a stage's result depends on, by content.

A finished stage is redone only when its fingerprint changes: the config sections it depends on (the
`sections` each stage registers, deepalign/plugins.py) and the contents of the local files, model folders and
dataset folders these name. Keys that only say where things are (LOCATIONS: the cache, the outputs) are left
out: the same run with another `DEEPALIGN_CACHE` is the same run. Files are hashed by content (sha256), never
by their times (deepalign/storage/digests.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from deepalign.storage.digests import DigestCache

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
