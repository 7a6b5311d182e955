"""Generations stored in a run dir and reused only when still valid: the same weights, the same input ids,
the same sampling settings and seed (and the KV cache implementation, where it is not the default). Every
stage that generates (attack, utility, the quickstart's harvest) goes through `generate_variants`."""

from __future__ import annotations

import hashlib
import json
import logging

from deepalign.eval_items import EvalItem, Variant, build_requests
from deepalign.generation import GenerationRequest
from deepalign.storage.jsonl import JsonlStore

log = logging.getLogger(__name__)


def _fresh(record: dict, info: dict, params: dict, model_id: str) -> bool:
    """A stored generation is reused only if it came from these weights, these exact input ids (prompt,
    system prompt, chat template, prefill) and these sampling settings and seed."""
    same_inputs = all(record.get(k) == v for k, v in info.items())
    return same_inputs and record.get("params") == params and record.get("model_id", "") == model_id


def computation_id(model_id: str, seed: int, cache: str = "dynamic", shared: bool = True) -> str:
    """What a record's `model_id` field holds: the weights, the seed and, unless it is the default, the
    engine's KV cache implementation and prefix sharing (`generation.share_prefixes=false`): a static cache's
    compiled decoding step, or a row's KV cache computed in another forward pass, may round the last bits of
    the logits differently, which can flip a near-tie. Records of the defaults stay valid as they were."""
    key = f"{model_id}:seed={seed}"
    key = key if cache == "dynamic" else f"{key}:cache={cache}"
    return key if shared or cache != "dynamic" else f"{key}:prefixes=own"


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
    return the keys of the variant's records (`generate_variants` for one variant)."""
    return generate_variants(
        engine, [(store, variant)], items, tokenizer, system=system, seed=seed, model_id=model_id
    )[0]


def _greedy_key(record: dict) -> tuple[str, str, int] | None:
    """What makes two greedy answers one computation (the weights and seed being the call's): the input ids,
    the settings and the sample; None for a sampled answer (its random stream depends on the request id)."""
    if record["params"].get("do_sample"):
        return None
    return record["input_sha"], json.dumps(record["params"], sort_keys=True), record["sample"]


def generate_variants(
    engine,
    work: list[tuple[JsonlStore, Variant]],
    items: list[EvalItem],
    tokenizer,
    *,
    system: str | None,
    seed: int,
    model_id: str = "",
) -> list[list[str]]:
    """Generate every (item, sample) of each (store, variant) not already in its store, in one engine call
    (the engine decodes nested greedy prompts, a prefilling attack's depths, from one KV cache, and equal
    greedy requests once), appending as batches finish; return each variant's record keys.

    `model_id` names the weights (see `RunContext.model_id`): records of other weights, other input ids
    (`input_sha`: prompt, system prompt, template, prefill), sampling setting, seed or KV cache
    implementation (`engine.cache`, see `computation_id`) are stale and generated again (the new record
    replaces the old one). A greedy answer a store already holds for the same input ids and settings (e.g. a
    prefill attack's depth 0 and the plain request) is copied, not generated again.
    """
    model_id = computation_id(
        model_id, seed, getattr(engine, "cache", "dynamic"), getattr(engine, "share_prefixes", True)
    )
    keys: list[list[str]] = []
    todo: dict[str, tuple[JsonlStore, Variant, dict, dict]] = {}  # request id -> where its result goes
    pending, context = [], []
    answers: dict[tuple, dict] = {}  # fresh greedy records, by `_greedy_key`
    missing: list[tuple[JsonlStore, Variant, GenerationRequest, dict, str]] = []
    for store, variant in work:
        requests, info = build_requests(variant, items, tokenizer, system=system, seed=seed)
        params = variant.params.as_dict()
        for r in requests:
            info[r.id]["input_sha"] = input_digest(r.input_ids)
            if not r.params.do_sample:
                context.append(r.input_ids)
            for s in range(r.n):
                key = f"{r.id}/{s}"
                record = store.records.get(key)
                if record is not None and _fresh(record, info[r.id], params, model_id):
                    if (same := _greedy_key(record)) is not None:
                        answers.setdefault(same, record)
                else:
                    missing.append((store, variant, r, info[r.id], key))
        keys.append([f"{r.id}/{s}" for r in requests for s in range(r.n)])
        todo.update({r.id: (store, variant, info[r.id], params) for r in requests})
        to_do = sum(1 for m in missing if m[1] is variant)
        total = len(keys[-1])
        log.info(
            "%s: %d of %d generations already done, %d to generate", variant.name, total - to_do, total, to_do
        )
    copies: dict[int, list[dict]] = {}
    for store, variant, request, info, key in missing:
        sample = int(key.rsplit("/", 1)[1])
        record = {"params": variant.params.as_dict(), "input_sha": info["input_sha"], "sample": sample}
        found = answers.get(_greedy_key(record) or ())
        if found is not None:
            copies.setdefault(id(store), [store]).append(
                {**found, **info, "key": key, "variant": variant.name}
            )
        elif not pending or pending[-1] is not request:
            pending.append(request)
    for store, *records in copies.values():
        store.append(records)
    buffers: dict[int, list] = {}
    for result in engine.generate(pending, context) if pending else []:
        store, variant, info, params = todo[result.id]
        key = f"{result.id}/{result.sample}"
        if store.records.get(key) is not None and _fresh(store.records[key], info, params, model_id):
            continue
        record = {
            "key": key,
            "variant": variant.name,
            **info,
            "sample": result.sample,
            "response": result.text,
            "finished": result.finished,
            "params": params,
            "model_id": model_id,
        }
        buffer = buffers.setdefault(id(store), [store])
        buffer.append(record)
        if len(buffer) > 8:
            store.append(buffer[1:])
            del buffer[1:]
    for store, *records in buffers.values():
        store.append(records)
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
