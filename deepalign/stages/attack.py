"""The `attack` stage: generate under every configured attack, judge, report attack success rates.

Artifacts: `generations/<attack>.jsonl` (key, prompt id, prompt, prefill, response, sampling parameters),
`judgments/<attack>.<judge>.jsonl`, `attacks/gcg.jsonl` (suffixes, loss curves). Each is appended as work
finishes, so a killed run started again redoes nothing that was finished.
Metrics: `asr/<variant>` by the primary judge (`eval.primary_judge`), `asr_<judge>/<variant>` by each judge,
and `asr/decoding` (a prompt is broken if any decoding setting breaks it); `eval/empty_rate` (and per variant)
the share of empty answers; `throughput/attack/gen_*` what this run generated, how fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path

from deepalign.artifacts import JsonlStore
from deepalign.attacks import (
    EvalItem,
    Variant,
    attack_variants,
    build_requests,
    check_prefill_depths,
    read_eval_items,
)
from deepalign.generation import default_params, make_engine
from deepalign.judges import JudgeItem, Judgment, attack_success_rate, build_judges

log = logging.getLogger(__name__)


def primary_judge(ctx) -> str:
    judges = [k for k, v in vars(ctx.config.judge).items() if v is not None]
    if ctx.config.eval.primary_judge:
        return ctx.config.eval.primary_judge
    return next(j for j in ("rubric", "classifier", "keyword", "keyword_substantive") if j in judges)


def _fresh(record: dict, info: dict, params: dict, model_id: str) -> bool:
    """A stored generation is reused only if it came from these weights, these exact input ids (prompt,
    system prompt, chat template, prefill) and these sampling settings and seed."""
    same_inputs = all(record.get(k) == v for k, v in info.items())
    return same_inputs and record.get("params") == params and record.get("model_id", "") == model_id


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
    suffixes: dict[str, str] | None = None,
    model_id: str = "",
) -> list[str]:
    """Generate every (item, sample) of a variant not already in the store, appending as batches finish;
    return the keys of the variant's records.

    `model_id` names the weights (see `RunContext.model_id`): records of other weights, other input ids
    (`input_sha`: prompt, system prompt, template, prefill), sampling setting or seed are stale and generated
    again (the new record replaces the old one).
    """
    requests, info = build_requests(variant, items, tokenizer, system=system, seed=seed, suffixes=suffixes)
    for r in requests:
        info[r.id]["input_sha"] = input_digest(r.input_ids)
    params, model_id = variant.params.as_dict(), f"{model_id}:seed={seed}"
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


def generation_digest(generation: dict) -> str:
    """What a judgment depends on in a generation record (the judged text and the request)."""
    parts = [generation.get(k) for k in ("request", "prompt", "prefill", "response")]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def judge_store(run_dir: Path, attack: str, judge, generations: list[dict]) -> JsonlStore:
    """Judge every generation record not yet judged by this judge (same version, same generation)."""
    store = JsonlStore(run_dir / "judgments" / f"{attack}.{judge.name}.jsonl")

    def fresh(key: str, g: dict) -> bool:
        j = store.records.get(key)
        return j is not None and j.get("version") == judge.version and j.get("digest") == generation_digest(g)

    todo = [g for g in generations if not fresh(g["key"], g)]
    chunk = 64
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        items = [
            JudgeItem(id=g["key"], prompt=g["request"], response=g["response"], prefill=g["prefill"])
            for g in part
        ]
        judgments = judge.judge(items)
        store.append(
            [
                {
                    "key": j.id,
                    "variant": g["variant"],
                    "prompt_id": g["prompt_id"],
                    "digest": generation_digest(g),
                    **vars(j),
                }
                for j, g in zip(judgments, part)
            ]
        )
    return store


def success_rates(judgments: list[dict], prefix: str) -> dict[str, float]:
    """ASR per variant; for decoding also the any-setting rate per prompt (`<prefix>/decoding`)."""
    by_variant: dict[str, list] = defaultdict(list)
    broken: dict[str, bool] = {}
    for record in judgments:
        fields = {k: record[k] for k in Judgment.__dataclass_fields__ if k in record}
        j = Judgment(**fields)
        by_variant[record["variant"]].append(j)
        if record["variant"].startswith("decoding/") and j.harmful is not None:
            broken[record["prompt_id"]] = broken.get(record["prompt_id"], False) or j.harmful
    out = {f"{prefix}/{v}": round(attack_success_rate(js), 4) for v, js in sorted(by_variant.items())}
    if broken:
        out[f"{prefix}/decoding"] = round(sum(broken.values()) / len(broken), 4)
    return out


def run_gcg_suffixes(ctx, items: list[EvalItem], model, tokenizer, system: str | None) -> dict[str, str]:
    """GCG suffixes per item (or one universal suffix), resumed from `attacks/gcg.jsonl`: a stored suffix is
    reused only if searched on these weights, prompt(s), target(s), GCG settings, system prompt and seed."""
    from deepalign.gcg import default_target, run_gcg

    cfg = ctx.config.attack.gcg
    store = JsonlStore(ctx.run_dir / "attacks" / "gcg.jsonl")
    chosen = items[: cfg.max_prompts] if cfg.max_prompts else items
    targets = {i.id: i.target or default_target(i.request, cfg.target_template) for i in chosen}
    setting = [ctx.model_id(), dataclasses.asdict(cfg), ctx.config.seed, system]

    def search_id(searched: list[EvalItem]) -> str:
        blob = json.dumps([setting, [[i.prompt, targets[i.id]] for i in searched]], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    wanted = {"universal": search_id(chosen)} if cfg.universal else {i.id: search_id([i]) for i in chosen}
    stale = {k for k, v in wanted.items() if store.records.get(k, {}).get("search_id") != v}
    todo = chosen if cfg.universal and stale else [i for i in chosen if i.id in stale]
    if todo:
        results = run_gcg(
            model,
            tokenizer,
            [i.prompt for i in todo],
            [targets[i.id] for i in todo],
            cfg,
            system=system,
            seed=ctx.config.seed,
            prompt_ids=[i.id for i in todo],
        )
        for r in results:
            store.append([{"key": r.prompt_id, **vars(r), "search_id": wanted[r.prompt_id]}])
    if cfg.universal:
        return {i.id: store.records["universal"]["suffix"] for i in chosen}
    return {i.id: store.records[i.id]["suffix"] for i in chosen}


def empty_rates(generations: list[dict]) -> dict[str, float]:
    """The share of empty or whitespace-only responses (`eval/empty_rate`, and per variant); warns about a
    variant where most are empty: a judge counts an empty answer as a refusal."""
    by_variant: dict[str, list[bool]] = defaultdict(list)
    for g in generations:
        by_variant[g["variant"]].append(not g["response"].strip())
    flags = [f for fs in by_variant.values() for f in fs]
    if not flags:
        return {}
    out = {"eval/empty_rate": round(sum(flags) / len(flags), 4)}
    for variant, fs in sorted(by_variant.items()):
        out[f"eval/empty_rate/{variant}"] = round(sum(fs) / len(fs), 4)
        if sum(fs) > len(fs) / 2:
            log.warning(
                "attack %s: %d of %d answers are empty: the model answered nothing for most prompts "
                "(a broken (NaN?) model counts as refusing)",
                variant,
                sum(fs),
                len(fs),
            )
    return out


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


def run_attack(ctx) -> dict[str, float]:
    cfg = ctx.config
    items = read_eval_items(cfg.eval)
    judges = build_judges(cfg.judge, Path(cfg.paths.cache_dir).expanduser())
    loaded = ctx.model()
    tokenizer = loaded.tokenizer
    system = cfg.data.system_prompt
    if cfg.attack.prefill is not None:
        check_prefill_depths(items, cfg.attack.prefill.depths, tokenizer, system=system)
    engine = make_engine(cfg.generation, loaded, model_path=ctx.model_path())
    base = default_params(cfg.generation)
    variants = attack_variants(cfg.attack, base)
    if cfg.attack.gcg is not None:
        suffixes = run_gcg_suffixes(ctx, items, loaded.model, tokenizer, system)
        gcg_items = [i for i in items if i.id in suffixes]
        variants["gcg"] = [Variant("gcg", base)]
    metrics: dict[str, float] = {"attack/eval_items": len(items)}
    main = primary_judge(ctx)
    generations: list[dict] = []
    for attack, group in variants.items():
        store = JsonlStore(ctx.run_dir / "generations" / f"{attack}.jsonl")
        keys = []  # this config's records (the files may also hold those of earlier settings)
        for variant in group:
            log.info("attack %s: generating", variant.name)
            keys += generate_variant(
                engine,
                store,
                variant,
                gcg_items if attack == "gcg" else items,
                tokenizer,
                system=system,
                seed=cfg.seed,
                suffixes=suffixes if attack == "gcg" else None,
                model_id=ctx.model_id(),
            )
        generations += [store.records[k] for k in keys]
        for judge in judges:
            judgments = judge_store(ctx.run_dir, attack, judge, [store.records[k] for k in keys])
            rates = success_rates([judgments.records[k] for k in keys], f"asr_{judge.name}")
            metrics.update(rates)
            if judge.name == main:
                metrics.update({k.replace(f"asr_{judge.name}/", "asr/", 1): v for k, v in rates.items()})
    metrics.update(empty_rates(generations))
    metrics.update(throughput(engine, "attack"))
    return metrics
