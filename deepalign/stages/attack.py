"""The `attack` stage: generate under every configured attack, judge, report attack success rates.

Artifacts: `generations/<attack>.jsonl` (key, prompt id, prompt, prefill, response, sampling parameters),
`judgments/<attack>.<judge>.jsonl`, `attacks/<attack>.jsonl` (GCG's suffixes, loss curves). Each is appended
as work finishes, so a killed run started again redoes nothing that was finished. `<attack>` and `<judge>`
are instance names (`attack.<name>`, `judge.<name>`).
Metrics: `asr/<variant>` by the primary judge (`eval.primary_judge`), `asr_<judge>/<variant>` by each judge,
and `asr/<attack>` for attacks that aggregate (decoding: a prompt is broken if any setting breaks it), each
with `/n` (items judged; prompts for an aggregate) and its 95% Wilson interval `/ci95_low`, `/ci95_high`;
per prefill instance with depths, its ASR-vs-depth curve summarised (deepalign/depth.py): `depth/asr_auc`
(area under ASR vs depth over the depth range), `depth/k50` (the depth where ASR reaches 0.5) and
`depth/k50_censored` (1: never reached, k50 is the deepest depth) for the instance `prefill` by the primary
judge, `depth/<instance>/...` for another instance, `depth_<judge>/...` by each judge;
with two or more judges `judgments/agreement.json` and `agreement/<judge>~<judge>/{agreement,kappa}`;
`eval/empty_rate` (and per variant) the share of empty answers; `throughput/attack/gen_*` what this run
generated, how fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from deepalign.artifacts import JsonlStore
from deepalign.attacks import AttackRun, build_attacks, read_eval_items
from deepalign.context import RunContext
from deepalign.depth import depth_metrics
from deepalign.generation import default_params, make_engine
from deepalign.generation_store import generate_variant, throughput
from deepalign.judges import JudgeItem, Judgment, attack_success_rate, build_judges, primary_judge
from deepalign.plugins import register_stage
from deepalign.rundir import write_json_atomic
from deepalign.stats import agreement, cohen_kappa, wilson_interval

log = logging.getLogger(__name__)


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


def rate_interval(key: str, harmful: int, n: int) -> dict[str, float]:
    """`<key>/n` (the items judged) and its 95% Wilson interval `<key>/ci95_low`, `<key>/ci95_high`."""
    low, high = wilson_interval(harmful, n)
    return {f"{key}/n": n, f"{key}/ci95_low": round(low, 4), f"{key}/ci95_high": round(high, 4)}


def success_rates(judgments: list[dict], prefix: str, aggregate: str | None = None) -> dict[str, float]:
    """ASR per variant; with `aggregate` (an attack's name) also the any-variant rate per prompt
    (`<prefix>/<aggregate>`). Each rate also gets its n and 95% Wilson interval (`rate_interval`): n counts
    the judged items (failed judgments left out), for the aggregate the prompts."""
    by_variant: dict[str, list] = defaultdict(list)
    broken: dict[str, bool] = {}
    for record in judgments:
        fields = {k: record[k] for k in Judgment.__dataclass_fields__ if k in record}
        j = Judgment(**fields)
        by_variant[record["variant"]].append(j)
        if aggregate is not None and j.harmful is not None:
            broken[record["prompt_id"]] = broken.get(record["prompt_id"], False) or j.harmful
    out = {}
    for v, js in sorted(by_variant.items()):
        out[f"{prefix}/{v}"] = round(attack_success_rate(js), 4)
        judged = [j.harmful for j in js if j.harmful is not None]
        out.update(rate_interval(f"{prefix}/{v}", sum(judged), len(judged)))
    if broken:
        out[f"{prefix}/{aggregate}"] = round(sum(broken.values()) / len(broken), 4)
        out.update(rate_interval(f"{prefix}/{aggregate}", sum(broken.values()), len(broken)))
    return out


def _finite(value: float) -> float | None:
    """Rounded, or None (JSON null) where undefined."""
    return round(value, 4) if math.isfinite(value) else None


def _pair(first: dict[str, dict], second: dict[str, dict], variant: str | None) -> dict:
    """Two judges on the items both judged (of `variant`, or all): n, agreement, kappa, disagreeing keys."""
    keys = [
        key
        for key, record in first.items()
        if (variant is None or record["variant"] == variant)
        and record.get("harmful") is not None
        and second.get(key, {}).get("harmful") is not None
    ]
    a = [bool(first[k]["harmful"]) for k in keys]
    b = [bool(second[k]["harmful"]) for k in keys]
    return {
        "n": len(keys),
        "agreement": _finite(agreement(a, b)),
        "kappa": _finite(cohen_kappa(a, b)),
        "disagree": [k for k, x, y in zip(keys, a, b) if x != y],
    }


def judge_agreement(judged: dict[str, list[dict]]) -> tuple[dict, dict[str, float]]:
    """How the judges agree on this stage's answers: `judgments/agreement.json`'s content and the metrics.

    `judged` maps each judge to its judgment records. Per variant: each judge's ASR and n, and per judge pair
    (`<a>~<b>`, in config order) the items both judged, the share of equal verdicts, Cohen's kappa and the
    generation keys where they disagree (the answers to read). Over all variants: the same without the keys,
    and the metrics `agreement/<a>~<b>/agreement` and `agreement/<a>~<b>/kappa` (kappa is undefined, null in
    the file and no metric, when both judges give one and the same verdict to every item).
    """
    by_key = {name: {r["key"]: r for r in records} for name, records in judged.items()}
    pairs = list(combinations(by_key, 2))
    variants: dict[str, dict] = {}
    for variant in sorted({r["variant"] for records in judged.values() for r in records}):
        verdicts = {
            name: [r["harmful"] for r in records.values() if r["variant"] == variant]
            for name, records in by_key.items()
        }
        verdicts = {name: [v for v in vs if v is not None] for name, vs in verdicts.items()}  # judged only
        variants[variant] = {
            "asr": {name: _finite(sum(v) / len(v)) if v else None for name, v in verdicts.items()},
            "n": {name: len(v) for name, v in verdicts.items()},
            "pairs": {f"{a}~{b}": _pair(by_key[a], by_key[b], variant) for a, b in pairs},
        }
    overall = {}
    metrics: dict[str, float] = {}
    for a, b in pairs:
        stats = _pair(by_key[a], by_key[b], None)
        overall[f"{a}~{b}"] = {k: v for k, v in stats.items() if k != "disagree"}
        for name in ("agreement", "kappa"):
            if stats[name] is not None:
                metrics[f"agreement/{a}~{b}/{name}"] = stats[name]
    return {"judges": list(by_key), "variants": variants, "all": overall}, metrics


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


@register_stage(
    "attack", sections=("model", "eval", "attack", "judge", "generation", "data.system_prompt", "seed")
)
def run_attack(ctx: RunContext) -> dict[str, float]:
    cfg = ctx.config
    items = read_eval_items(cfg.eval)
    judges = build_judges(cfg.judge, Path(cfg.paths.cache_dir).expanduser())
    loaded = ctx.model()
    tokenizer = loaded.tokenizer
    system = cfg.data.system_prompt
    attacks = build_attacks(cfg.attack)
    for attack in attacks:
        attack.check(items, lambda: tokenizer, system=system)
    engine = make_engine(cfg.generation, loaded, model_path=ctx.model_path())
    base = default_params(cfg.generation)
    run = AttackRun(items, loaded.model, tokenizer, system, cfg.seed, ctx.run_dir, ctx.model_id)
    metrics: dict[str, float] = {"attack/eval_items": len(items)}
    main = primary_judge(cfg.judge, cfg.eval.primary_judge)
    generations: list[dict] = []
    judged: dict[str, list[dict]] = {judge.name: [] for judge in judges}  # this stage's judgments, per judge
    for attack in attacks:
        store = JsonlStore(ctx.run_dir / "generations" / f"{attack.name}.jsonl")
        keys = []  # this config's records (the files may also hold those of earlier settings)
        for variant in attack.variants(run, base):
            log.info("attack %s: generating", variant.name)
            keys += generate_variant(
                engine,
                store,
                variant,
                items,
                tokenizer,
                system=system,
                seed=cfg.seed,
                model_id=ctx.model_id(),
            )
        generations += [store.records[k] for k in keys]
        aggregate = attack.name if attack.aggregate else None
        for judge in judges:
            judgments = judge_store(ctx.run_dir, attack.name, judge, [store.records[k] for k in keys])
            records = [judgments.records[k] for k in keys]
            judged[judge.name] += records
            rates = success_rates(records, f"asr_{judge.name}", aggregate)
            metrics.update(rates)
            if judge.name == main:
                metrics.update({k.replace(f"asr_{judge.name}/", "asr/", 1): v for k, v in rates.items()})
    prefill = [name for name, a in cfg.attack.items() if a.type == "prefill" and a.depths]
    metrics.update(depth_metrics(metrics, prefill, [judge.name for judge in judges], main))
    # every answer with each judge's verdict, one table per run: to read the answers and compare runs in W&B
    verdicts = {name: {r["key"]: r.get("harmful") for r in records} for name, records in judged.items()}
    ctx.tracker.table(
        "attack/generations",
        ["prompt_id", "variant", "sample", "prefill", "response", *(f"harmful_{name}" for name in verdicts)],
        [
            [g["prompt_id"], g["variant"], g["sample"], g["prefill"], g["response"]]
            + [v[g["key"]] for v in verdicts.values()]
            for g in generations
        ],
    )
    if len(judges) > 1:
        report, values = judge_agreement(judged)
        write_json_atomic(ctx.run_dir / "judgments" / "agreement.json", report)
        metrics.update(values)
    metrics.update(empty_rates(generations))
    metrics.update(throughput(engine, "attack"))
    return metrics
