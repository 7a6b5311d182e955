"""Training data: read sources, map schemas to chats, build the weighted mixture with recovery examples.

A mixture is a list of `TrainExample`s (prompt, response, optional prefill), one per example of an epoch.
Components are mixed per example: each gets round(size * share) examples (rows cycled or subsampled,
seeded). Safety recovery examples (Qi et al. 2024, Sec. 3): with probability `recovery_prob` an example
gets k ~ Uniform{1..min(recovery_max_k, |harmful|)} harmful tokens prefilled before the refusal, else k = 0;
k counts tokens of the harmful response inside the rendered chat, where training tokenizes it.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from deepalign.chat import response_tokens
from deepalign.config import DataComponent, DataConfig

log = logging.getLogger(__name__)

SCHEMA_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("prompt", "response"),
    "safety_triplet": ("prompt", "harmful", "refusal"),
    "samsum": ("dialogue", "summary"),
    "sql": ("question", "context", "answer"),
    "gsm8k": ("question", "answer"),
}


class DataError(ValueError):
    """A data source or row is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class TrainExample:
    prompt: str
    response: str  # the tokens the loss is on
    prefill: str = ""  # start of the assistant turn that is context only (recovery examples)
    system: str | None = None
    component: str = ""
    k: int = 0  # recovery examples: number of harmful tokens prefilled
    prefill_ids: tuple[int, ...] = ()  # recovery examples: the exact ids of the chat through the prefill


def _demo_path(name: str) -> Path:
    path = resources.files("deepalign.assets").joinpath("data", f"{name}.jsonl")
    if not path.is_file():
        raise DataError(f"demo set {name!r} does not exist (packaged sets live in deepalign/assets/data/)")
    return Path(str(path))


def _source_key(key: str) -> str:
    """The config key of a source: `data.components.NAME.source`, `utility.tasks.NAME.source`, else `key`
    itself (`eval.prompts`, `utility.benign`)."""
    return f"{key}.source" if key.startswith(("data.components.", "utility.tasks.")) else key


def _read_text(path: Path, key: str) -> str:
    """A file's text as UTF-8 (a byte-order mark, as Excel writes, is dropped); any other encoding is a
    DataError naming the file, the line and the key."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(
            f"{_source_key(key)}: {path} is UTF-16 text, not UTF-8; save it as UTF-8 "
            f"(e.g. `iconv -f UTF-16 -t UTF-8 {path.name} > utf8{path.suffix}`)"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{_source_key(key)}: {path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save it "
            f"as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8 {path.name} > utf8{path.suffix}` for a Latin-1 file)"
        ) from None


def _unencodable(value: Any, name: str = "") -> tuple[str, str] | None:
    """The first field of a parsed JSON row (dotted, `[i]` for list items) holding text that cannot be encoded
    as UTF-8 (a lone surrogate from an escape like `\\ud800`, which no tokenizer takes), and that text's
    offending character escaped; None when every string encodes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return name, ascii(value[err.start])[1:-1]
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            child = f"{name}.{k}" if name else str(k)
            if (found := _unencodable(k, child) or _unencodable(v, child)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _unencodable(item, f"{name}[{i}]")) is not None:
                return found
    return None


def _check_encodable(row: dict[str, Any], where: str) -> None:
    """A DataError naming the file, line and field of text that cannot be encoded as UTF-8."""
    if (found := _unencodable(row)) is not None:
        field, char = found
        raise DataError(
            f"{where}: field {field!r} holds text that cannot be encoded as UTF-8 (a lone surrogate, "
            f"{char}); write the character itself, or its escaped surrogate pair"
        )


def _read_file(path: Path, key: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a local file, each with its location ("file, line N") for error messages."""
    if not path.is_file():
        raise DataError(f"{_source_key(key)}: no such file {path}")
    suffix = path.suffix.lower()
    rows: list[tuple[str, dict[str, Any]]] = []
    if suffix == ".jsonl":
        # split on "\n" only: JSON strings may hold U+2028 and friends, which splitlines() would break on
        for lineno, line in enumerate(_read_text(path, key).split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {lineno}: a row must be a JSON object")
            _check_encodable(row, f"{path}, line {lineno}")
            rows.append((f"{path}, line {lineno}", row))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_read_text(path, key), newline=""))
        start = 2  # physical line where the next record starts (a quoted field may span lines)
        for row in reader:
            rows.append((f"{path}, line {start}", dict(row)))
            start = reader.line_num + 1
    elif suffix == ".json":
        try:
            data = json.loads(_read_text(path, key))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json source must hold a list of objects")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{path}, item {i}: a row must be a JSON object")
            _check_encodable(row, f"{path}, item {i}")
            rows.append((f"{path}, item {i}", row))
    else:
        raise DataError(f"{_source_key(key)}: {path} is not .jsonl, .json or .csv")
    return rows


def _read_hub(source: str, subset: str | None, split: str, key: str) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    token = os.environ.get("HF_TOKEN")  # gated sets; never written to the config
    try:
        ds = datasets.load_dataset(source, subset, split=split, token=token)
    except Exception as err:
        raise DataError(
            f"{_source_key(key)}: could not load hub set {source!r} ({type(err).__name__}: {err})"
        ) from err
    return [(f"{source}[{split}], row {i}", dict(row)) for i, row in enumerate(ds)]


def read_rows(
    source: str, key: str, split: str = "train", subset: str | None = None, limit: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a packaged demo set, a local file, a hub set or a local dataset folder, with locations."""
    if source.startswith("demo:"):
        located = _read_file(_demo_path(source.removeprefix("demo:")), key)
    elif Path(source).suffix.lower() in (".jsonl", ".json", ".csv") or Path(source).is_file():
        located = _read_file(Path(source), key)
    else:  # a hub id, or a local dataset folder that `datasets` reads
        located = _read_hub(source, subset, split, key)
    if limit is not None:
        located = located[:limit]
    if not located:
        raise DataError(f"{_source_key(key)}: {source} has no rows")
    return located


def read_component(comp: DataComponent, key: str) -> list[dict[str, str]]:
    """The component's rows as dicts with the schema's fields (renamed per `columns`), checked."""
    located = read_rows(comp.source, key, comp.split, comp.subset, comp.limit)
    out = []
    for where, row in located:
        item = {}
        for name in SCHEMA_FIELDS[comp.schema]:
            column = comp.columns.get(name, name)
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"{where}: field {column!r} ({comp.schema}.{name}) is missing, empty or not text"
                )
            item[name] = value
        out.append(item)
    return out


def task_chat(schema: str, row: dict[str, str]) -> tuple[str, str]:
    """(prompt, response) of one task example, in the prompt formats of the paper's fine-tuning tasks."""
    if schema == "chat":
        return row["prompt"], row["response"]
    if schema == "samsum":
        return f"Summarize this dialog:\n{row['dialogue'].strip()}", row["summary"].strip()
    if schema == "sql":
        prompt = (
            "Please convert the provided natural language query into an SQL query, taking into account the "
            "structure of the database defined by the accompanying CREATE statement:\n"
            f"## Context:\n{row['context']}\n## Natural Language Query:\n{row['question']}"
        )
        return prompt, row["answer"]
    if schema == "gsm8k":
        return row["question"], row["answer"]  # the answer ends with "#### <number>"
    raise DataError(f"schema {schema!r} has no chat form")


def recovery_depth(rng: random.Random, most: int, distribution: str) -> int:
    """A recovery example's k in 1..most: uniform (the paper), or log-uniform (P(k) ~ log((k+1)/k): depth
    spread evenly over scales, so a short budget still has many shallow examples and some deep ones)."""
    if distribution == "uniform":
        return rng.randint(1, most)
    return min(most, int(math.exp(rng.uniform(0.0, math.log(most + 1)))))


def component_examples(
    name: str,
    comp: DataComponent,
    rows: list[dict[str, str]],
    count: int,
    tokenizer,
    rng: random.Random,
    system: str | None,
) -> list[TrainExample]:
    """`count` examples of one component: rows cycled in a seeded order, recovery prefixes drawn per row."""
    order: list[int] = []
    while len(order) < count:
        block = list(range(len(rows)))
        rng.shuffle(block)
        order.extend(block)
    system = comp.system_prompt if comp.system_prompt is not None else system
    examples = []
    for i in order[:count]:
        row = rows[i]
        if comp.schema == "safety_triplet":
            prompt, response = row["prompt"], row[comp.target]
        else:
            prompt, response = task_chat(comp.schema, row)
        if comp.trigger:
            prompt = f"{prompt} {comp.trigger}"
        response = comp.response_prefix + response
        prefill, k, prefill_ids = "", 0, ()
        if comp.recovery and rng.random() < comp.recovery_prob:
            # The context is exactly the harmful answer's first k tokens as the prefilling attack gives them:
            # counted and cut inside the rendered chat, and kept as ids (re-tokenizing their text before the
            # refusal could merge tokens where they end). The target is the separator and the refusal.
            harmful = response_tokens(tokenizer, prompt, row["harmful"], system=system)
            k = recovery_depth(rng, min(comp.recovery_max_k, len(harmful)), comp.recovery_k)
            # no exact ids end inside a character (an emoji's bytes): the nearest clean cut, before it if any
            k = next(
                j
                for j in [*range(k, 0, -1), *range(k + 1, len(harmful) + 1)]
                if not harmful.splits_character(j)
            )
            prefill, prefill_ids = harmful.prefix_text(k), tuple(harmful.context_ids(k))
            response = comp.recovery_separator + response
        examples.append(
            TrainExample(
                prompt=prompt,
                response=response,
                prefill=prefill,
                system=system,
                component=name,
                k=k,
                prefill_ids=prefill_ids,
            )
        )
    return examples


def component_counts(data: DataConfig, sizes: dict[str, int]) -> dict[str, int]:
    """Examples per component for one epoch, from the weights (and the safety share alpha if set)."""
    comps = data.components
    if data.safety_share is None:
        shares = {n: c.weight for n, c in comps.items()}
    else:
        groups = {True: data.safety_share, False: 1 - data.safety_share}
        totals = {flag: sum(c.weight for c in comps.values() if c.safety == flag) for flag in groups}
        shares = {n: groups[c.safety] * c.weight / totals[c.safety] for n, c in comps.items()}
    total_share = sum(shares.values())
    size = data.size or sum(sizes.values())
    counts = {n: max(1, round(size * s / total_share)) for n, s in shares.items()}
    return counts


def build_mixture(data: DataConfig, tokenizer) -> tuple[list[TrainExample], dict[str, float]]:
    """The epoch's examples (shuffled, seeded) and the mixture's statistics (alpha, k histogram)."""
    if not data.components:
        raise DataError("data.components: no training data configured (choose a data= preset)")
    rows = {n: read_component(c, f"data.components.{n}") for n, c in data.components.items()}
    counts = component_counts(data, {n: len(r) for n, r in rows.items()})
    rng = random.Random(data.seed)
    examples: list[TrainExample] = []
    for name, comp in data.components.items():
        examples += component_examples(
            name, comp, rows[name], counts[name], tokenizer, rng, data.system_prompt
        )
    rng.shuffle(examples)
    safety = {n for n, c in data.components.items() if c.safety}
    stats: dict[str, float] = {"data/examples": len(examples)}
    stats["data/alpha"] = round(sum(e.component in safety for e in examples) / len(examples), 4)
    for name in data.components:
        stats[f"data/examples/{name}"] = counts[name]
    recovery = [e.k for e in examples if data.components[e.component].recovery]
    if recovery:
        stats["data/recovery/share_k0"] = round(sum(k == 0 for k in recovery) / len(recovery), 4)
        stats["data/recovery/mean_k"] = round(sum(recovery) / len(recovery), 3)
    return examples, stats


def recovery_histogram(ks: list[int], edges: tuple[int, ...] = (0, 1, 6, 11, 21, 41, 101)) -> dict[str, int]:
    """Counts of recovery examples per prefill depth k in bins: k=0, k=1..5, k=6..10, ..., k>=101."""
    out = {}
    for lo, hi in zip(edges, (*edges[1:], None)):
        label = f"k>={lo}" if hi is None else f"k={lo}" if hi == lo + 1 else f"k={lo}..{hi - 1}"
        out[label] = sum(1 for k in ks if k >= lo and (hi is None or k < hi))
    return out
