"""Generations stored in a run dir and reused only when still valid: the same weights, the same input ids,
the same sampling settings and seed (and the KV cache implementation, where it is not the default). Every
stage that generates (attack, utility, the quickstart's harvest) goes through `generate_variant`."""

from __future__ import annotations

import hashlib
import json
import logging

from deepalign.artifacts import JsonlStore
from deepalign.attacks import EvalItem, Variant, build_requests

log = logging.getLogger(__name__)


def _fresh(record: dict, info: dict, params: dict, model_id: str) -> bool:
    """A stored generation is reused only if it came from these weights, these exact input ids (prompt,
    system prompt, chat template, prefill) and these sampling settings and seed."""
    same_inputs = all(record.get(k) == v for k, v in info.items())
    return same_inputs and record.get("params") == params and record.get("model_id", "") == model_id


def computation_id(model_id: str, seed: int, cache: str = "dynamic") -> str:
    """What a record's `model_id` field holds: the weights, the seed and, unless it is the default (dynamic),
    the engine's KV cache implementation (a static cache's compiled decoding step may round the last bits of
    the logits differently, which can flip a near-tie). Records of the default stay valid as they were."""
    key = f"{model_id}:seed={seed}"
    return key if cache == "dynamic" else f"{key}:cache={cache}"


def input_digest(input_ids: list[int]) -> str:
    """A short hash of the exact token ids a model was given."""
    return hashlib.sha256(json.dumps(input_ids).encode()).hexdigest()[:16]


def generate_variant(
    engine,
    store: JsonlStore,
    variant: Variant,
    items: list[EvalItem],
    tokenizer,
    *,
    system: str | None,
    seed: int,
    model_id: str = "",
) -> list[str]:
    """Generate every (item, sample) of a variant not already in the store, appending as batches finish;
    return the keys of the variant's records.

    `model_id` names the weights (see `RunContext.model_id`): records of other weights, other input ids
    (`input_sha`: prompt, system prompt, template, prefill), sampling setting, seed or KV cache
    implementation (`engine.cache`, see `computation_id`) are stale and generated again (the new record
    replaces the old one).
    """
    requests, info = build_requests(variant, items, tokenizer, system=system, seed=seed)
    for r in requests:
        info[r.id]["input_sha"] = input_digest(r.input_ids)
    params = variant.params.as_dict()
    model_id = computation_id(model_id, seed, getattr(engine, "cache", "dynamic"))
    fresh = {
        key
        for r in requests
        for s in range(r.n)
        if (key := f"{r.id}/{s}") in store.records
        and _fresh(store.records[key], info[r.id], params, model_id)
    }
    keys = [f"{r.id}/{s}" for r in requests for s in range(r.n)]
    pending = [r for r in requests if any(f"{r.id}/{s}" not in fresh for s in range(r.n))]
    total = sum(r.n for r in requests)
    log.info(
        "%s: %d of %d generations already done, %d to generate",
        variant.name,
        len(fresh),
        total,
        total - len(fresh),
    )
    if not pending:
        return keys
    buffer = []
    for result in engine.generate(pending):
        key = f"{result.id}/{result.sample}"
        if key in fresh:
            continue
        buffer.append(
            {
                "key": key,
                "variant": variant.name,
                **info[result.id],
                "sample": result.sample,
                "response": result.text,
                "finished": result.finished,
                "params": params,
                "model_id": model_id,
            }
        )
        if len(buffer) >= 8:
            store.append(buffer)
            buffer = []
    store.append(buffer)
    return keys


def throughput(engine, stage: str) -> dict[str, float]:
    """Generation throughput of what `engine` generated in this run (nothing if it generated nothing)."""
    stats = getattr(engine, "stats", None)
    if stats is None or not stats.sequences:
        return {}
    return {
        f"throughput/{stage}/gen_tokens_per_s": round(stats.tokens_per_s, 2),
        f"throughput/{stage}/gen_tokens": stats.new_tokens,
        f"throughput/{stage}/gen_seconds": round(stats.seconds, 3),
    }
