"""The `attack` stage: generate under every configured attack, judge, report attack success rates.

Artifacts: `generations/<attack>.jsonl` (key, prompt id, prompt, prefill, response, sampling parameters),
`judgments/<attack>.<judge>.jsonl`, `attacks/gcg.jsonl` (suffixes, loss curves). Each is appended as work
finishes, so a killed run started again redoes nothing that was finished.
Metrics: `asr/<variant>` by the primary judge (`eval.primary_judge`), `asr_<judge>/<variant>` by each judge,
and `asr/decoding` (a prompt is broken if any decoding setting breaks it).
"""

from __future__ import annotations

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
    return next(j for j in ("rubric", "classifier", "keyword") if j in judges)


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
) -> None:
    """Generate every (item, sample) of a variant not already in the store, appending as batches finish."""
    requests, info = build_requests(variant, items, tokenizer, system=system, seed=seed, suffixes=suffixes)
    pending = [r for r in requests if any(f"{r.id}/{s}" not in store.records for s in range(r.n))]
    total = sum(r.n for r in requests)
    todo = sum(f"{r.id}/{s}" not in store.records for r in requests for s in range(r.n))
    log.info("%s: %d of %d generations already done, %d to generate", variant.name, total - todo, total, todo)
    if not pending:
        return
    buffer = []
    for result in engine.generate(pending):
        key = f"{result.id}/{result.sample}"
        if key in store.records:
            continue
        buffer.append(
            {
                "key": key,
                "variant": variant.name,
                **info[result.id],
                "sample": result.sample,
                "response": result.text,
                "finished": result.finished,
                "params": variant.params.as_dict(),
            }
        )
        if len(buffer) >= 8:
            store.append(buffer)
            buffer = []
    store.append(buffer)


def judge_store(run_dir: Path, attack: str, judge, generations: JsonlStore) -> JsonlStore:
    """Judge every generation of an attack not yet judged by this judge; return the judgments."""
    store = JsonlStore(run_dir / "judgments" / f"{attack}.{judge.name}.jsonl")
    todo = [g for k, g in generations.records.items() if k not in store.records]
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
                {"key": j.id, "variant": g["variant"], "prompt_id": g["prompt_id"], **vars(j)}
                for j, g in zip(judgments, part)
            ]
        )
    return store


def success_rates(judgments: JsonlStore, prefix: str) -> dict[str, float]:
    """ASR per variant; for decoding also the any-setting rate per prompt (`<prefix>/decoding`)."""
    by_variant: dict[str, list] = defaultdict(list)
    broken: dict[str, bool] = {}
    for record in judgments.values():
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
    """GCG suffixes per item (or one universal suffix), resumed from `attacks/gcg.jsonl`."""
    from deepalign.gcg import default_target, run_gcg

    cfg = ctx.config.attack.gcg
    store = JsonlStore(ctx.run_dir / "attacks" / "gcg.jsonl")
    chosen = items[: cfg.max_prompts] if cfg.max_prompts else items
    todo = [i for i in chosen if i.id not in store.records and "universal" not in store.records]
    if todo:
        targets = [i.target or default_target(i.request, cfg.target_template) for i in todo]
        results = run_gcg(
            model,
            tokenizer,
            [i.prompt for i in todo],
            targets,
            cfg,
            system=system,
            seed=ctx.config.seed,
            prompt_ids=[i.id for i in todo],
        )
        for r in results:
            store.append([{"key": r.prompt_id, **vars(r)}])
    if "universal" in store.records:
        return {i.id: store.records["universal"]["suffix"] for i in chosen}
    return {i.id: store.records[i.id]["suffix"] for i in chosen}


def run_attack(ctx) -> dict[str, float]:
    cfg = ctx.config
    items = read_eval_items(cfg.eval)
    judges = build_judges(cfg.judge, Path(cfg.paths.cache_dir).expanduser())
    loaded = ctx.model()
    tokenizer = loaded.tokenizer
    system = cfg.data.system_prompt
    if cfg.attack.prefill is not None:
        check_prefill_depths(items, cfg.attack.prefill.depths, tokenizer)
    engine = make_engine(cfg.generation, loaded, model_path=ctx.model_path())
    base = default_params(cfg.generation)
    variants = attack_variants(cfg.attack, base)
    if cfg.attack.gcg is not None:
        suffixes = run_gcg_suffixes(ctx, items, loaded.model, tokenizer, system)
        gcg_items = [i for i in items if i.id in suffixes]
        variants["gcg"] = [Variant("gcg", base)]
    metrics: dict[str, float] = {"attack/eval_items": len(items)}
    main = primary_judge(ctx)
    for attack, group in variants.items():
        store = JsonlStore(ctx.run_dir / "generations" / f"{attack}.jsonl")
        for variant in group:
            log.info("attack %s: generating", variant.name)
            if attack == "gcg":
                generate_variant(
                    engine,
                    store,
                    variant,
                    gcg_items,
                    tokenizer,
                    system=system,
                    seed=cfg.seed,
                    suffixes=suffixes,
                )
            else:
                generate_variant(engine, store, variant, items, tokenizer, system=system, seed=cfg.seed)
        for judge in judges:
            judgments = judge_store(ctx.run_dir, attack, judge, store)
            rates = success_rates(judgments, f"asr_{judge.name}")
            metrics.update(rates)
            if judge.name == main:
                metrics.update({k.replace(f"asr_{judge.name}/", "asr/", 1): v for k, v in rates.items()})
    return metrics
