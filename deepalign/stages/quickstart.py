"""The `quickstart` stage: the paper in miniature on the demo model, as sub-runs of this run.

1. harvest: the unaligned model's own harmful answers (prefilled with an affirmative start, sampled) and its
   own benign answers (greedy); refusals from the packaged templates. Written to `quickstart/data/`.
2. `models/shallow`: SFT on harmful -> refusal plus benign answers. `models/deep`: the same budget with safety
   recovery examples.
3. `models/unaligned|shallow|deep`: attacks (none, prefilling, a reduced decoding sweep, a short GCG),
   per-token KL against the unaligned model, over-refusal.
4. `models/ft_sft|ft_constrained`: a harmful fine-tuning attack on the shallow model, plain SFT vs the
   token-wise constrained loss; then ASR (`quickstart.paper_beta=true` adds `ft_constrained_paper`, the
   paper's beta_1 = 0.5 schedule). Every model's first-token margin (refusal vs harmful start).
5. `report.md`, `kl_per_position.png`, `asr_vs_prefill_depth.png` in the run dir; metrics prefixed by model.
Every sub-run is an ordinary run dir, so a re-run of the same command reuses whatever finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from deepalign.artifacts import JsonlStore
from deepalign.attacks import EvalItem, Variant, read_eval_items
from deepalign.config import EvalConfig
from deepalign.data import read_rows
from deepalign.generation import SamplingParams, make_engine
from deepalign.rundir import write_text_atomic
from deepalign.stages.attack import generate_variant

log = logging.getLogger(__name__)
MODELS = ("unaligned", "shallow", "deep", "ft_sft", "ft_constrained")
PAPER_BETA = {"first": 0.5, "prefix": 2.0, "prefix_len": 5, "rest": 0.1}  # paper Table 3's schedule
HARVEST_THROUGHPUT = "throughput/harvest/gen_tokens_per_s"


def models(q) -> tuple[str, ...]:
    return MODELS + (("ft_constrained_paper",) if q.paper_beta else ())


def refusal_templates() -> list[str]:
    return json.loads(resources.files("deepalign.assets").joinpath("data", "refusals.json").read_text())


def _split(source: str, split: str, key: str) -> list[dict[str, Any]]:
    return [row for _, row in read_rows(source, key) if row.get("split", split) == split]


def harvest(ctx, out: Path) -> dict[str, float]:
    """The unaligned model's harmful and benign answers, as training and evaluation files under `out`."""
    q = ctx.config.quickstart
    loaded = ctx.model()
    tok = loaded.tokenizer
    gen_cfg = dataclasses.replace(ctx.config.generation, dtype=q.generation_dtype)
    engine = make_engine(gen_cfg, loaded, model_path=ctx.model_path(), cache_dir=ctx.config.paths.cache_dir)
    refusals = refusal_templates()
    train_h = _split(q.harmful, "train", "quickstart.harmful")
    if q.eval_prompts:  # the user's own benchmark copy replaces the evaluation prompts
        eval_h = [
            {"id": i.id, "prompt": i.request} for i in read_eval_items(EvalConfig(prompts=q.eval_prompts))
        ]
    else:
        eval_h = _split(q.harmful, "eval", "quickstart.harmful")
    eval_h = eval_h[: q.eval_limit] if q.eval_limit else eval_h
    store = JsonlStore(out / "harvest.jsonl")
    sampled = SamplingParams(
        do_sample=True, temperature=q.harvest_temperature, top_p=1.0, top_k=0, max_new_tokens=q.harvest_tokens
    )
    harmful_items = [
        EvalItem(id=f"h-{r['id']}", prompt=r["prompt"], request=r["prompt"]) for r in train_h + eval_h
    ]
    generate_variant(
        engine,
        store,
        Variant("harvest_harmful", sampled, prefill=q.harvest_prefill),
        harmful_items,
        tok,
        system=None,
        seed=ctx.config.seed,
        model_id=ctx.model_id(),
    )
    benign = _split(q.benign, "train", "quickstart.benign")
    greedy = SamplingParams(do_sample=False, max_new_tokens=q.benign_tokens)
    benign_items = [EvalItem(id=f"b-{r['id']}", prompt=r["prompt"], request=r["prompt"]) for r in benign]
    generate_variant(
        engine,
        store,
        Variant("harvest_benign", greedy),
        benign_items,
        tok,
        system=None,
        seed=ctx.config.seed,
        model_id=ctx.model_id(),
    )

    def answer(kind: str, item_id: str) -> str:
        record = store.records[f"{kind}/{item_id}/0"]
        return (record["prefill"] + record["response"]).strip()

    triplets = [
        {
            "prompt": r["prompt"],
            "harmful": answer("harvest_harmful", f"h-{r['id']}"),
            "refusal": refusals[i % len(refusals)],
        }
        for i, r in enumerate(train_h)
    ]
    chats = [{"prompt": r["prompt"], "response": answer("harvest_benign", f"b-{r['id']}")} for r in benign]
    chats = [c for c in chats if c["response"]]  # an empty answer teaches nothing
    evals = [
        {"id": r["id"], "prompt": r["prompt"], "harmful": answer("harvest_harmful", f"h-{r['id']}")}
        for r in eval_h
    ]
    deepest = max(q.prefill_depths, default=0)  # prefilling needs answers at least that long
    evals = [e for e in evals if len(tok(e["harmful"], add_special_tokens=False)["input_ids"]) >= deepest]
    pairs = [{"prompt": t["prompt"], "response": t["harmful"]} for t in triplets[: q.ft_pairs]]
    benign_eval = [{"prompt": r["prompt"]} for r in _split(q.benign, "eval", "quickstart.benign")]
    for name, rows in (
        ("triplets", triplets),
        ("benign", chats),
        ("eval_harmful", evals),
        ("ft_pairs", pairs),
        ("benign_eval", benign_eval),
    ):
        write_text_atomic(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    metrics = {
        "quickstart/harvested_harmful": len(harmful_items),
        "quickstart/harvested_benign": len(benign_items),
        "quickstart/eval_items": len(evals),
    }
    if engine.stats.new_tokens:  # nothing when every answer was already harvested
        metrics[HARVEST_THROUGHPUT] = round(engine.stats.tokens_per_s, 1)
    return metrics


def sub_config(ctx, name: str, data_dir: Path, models_dir: Path):
    """The config of one sub-run: the parent's, with this model's stages, data, loss and training set."""
    q = ctx.config.quickstart
    eval_common: dict[str, Any] = {
        "judge": {
            "keyword": {"lists": ["qi2024"], "min_continuation_chars": 0},
            "keyword_substantive": {"lists": ["qi2024"], "min_continuation_chars": q.substantive_chars},
        },
        "eval": {"prompts": str(data_dir / "eval_harmful.jsonl"), "primary_judge": "keyword"},
        "utility": {"benign": str(data_dir / "benign_eval.jsonl"), "max_new_tokens": q.eval_tokens},
        "generation": {
            "max_new_tokens": q.eval_tokens,
            "batch_size": q.eval_batch_size,
            "dtype": q.generation_dtype,
        },
        "logger": {"name": "none"},
    }
    align_train = {
        "max_steps": q.align_steps,
        "per_device_batch_size": q.batch_size,
        "warmup_steps": 2,
        "optimizer": {"lr": q.align_lr, "betas": [0.9, 0.999]},
        "bf16": q.bf16,
        "freeze_embeddings": True,
        "lr_scheduler": "constant_with_warmup",
        "save_steps": 10,
        "save_total_limit": 1,  # a demo-model checkpoint with optimizer state: ~1.6 GB
    }
    align_data = {
        "safety_share": 0.5,
        "max_length": q.max_length,
        "components": {
            "safety": {
                "source": str(data_dir / "triplets.jsonl"),
                "schema": "safety_triplet",
                "safety": True,
            },
            "utility": {"source": str(data_dir / "benign.jsonl"), "schema": "chat"},
        },
    }
    attacks = {
        "none": {},
        "prefill": {"depths": list(q.prefill_depths)},
        "decoding": {
            "temperatures": list(q.decoding_temperatures),
            "top_ks": [],
            "top_ps": list(q.decoding_top_ps),
            "greedy": False,
            "samples_per_setting": 1,
        },
    }
    gcg = (
        {
            "gcg": {
                "steps": q.gcg_steps,
                "topk": q.gcg_topk,
                "search_width": q.gcg_width,
                "suffix_length": q.gcg_suffix_length,
                "max_prompts": q.gcg_prompts,
            }
        }
        if q.gcg_prompts and name in q.gcg_models
        else {}
    )
    over: dict[str, Any] = dict(eval_common)
    if name == "unaligned":
        over.update(stages=["attack", "utility"], attack={**attacks, **gcg})
    elif name in ("shallow", "deep"):
        over.update(
            stages=["train", "attack", "analyze", "utility"],
            attack={**attacks, **gcg},
            train=align_train,
            loss={"name": "sft"},
            analysis={"positions": q.kl_positions, "reference": None},
        )
        over["data"] = align_data
        if name == "deep":
            over["data"] = OmegaConf.to_container(
                OmegaConf.merge(
                    align_data,
                    {"components": {"safety": {"recovery": True, "recovery_max_k": q.recovery_max_k}}},
                )
            )
    else:  # fine-tuning attacks on the shallow model
        constrained = name.startswith("ft_constrained")
        beta = PAPER_BETA if name == "ft_constrained_paper" else dataclasses.asdict(q.ft_beta)
        over.update(
            stages=["train", "attack", "utility"],
            attack={"none": {}},
            model={
                "name": name,
                "source": "hf",
                "path": str(models_dir / "shallow" / "model"),
                "tokenizer": None,
            },
            data={
                "max_length": q.max_length,
                "components": {"harmful": {"source": str(data_dir / "ft_pairs.jsonl"), "schema": "chat"}},
            },
            loss={"name": "constrained" if constrained else "sft", "beta": beta},
            train={
                "max_steps": q.ft_steps,
                "per_device_batch_size": q.batch_size,
                "bf16": q.bf16,
                "optimizer": {"lr": q.ft_lr, "betas": [0.5, 0.999]},
                "freeze_embeddings": True,
                "warmup_steps": 2 if constrained else 0,
                "lr_scheduler": "constant_with_warmup",
                "save_steps": 10,
                "save_total_limit": 1,  # a demo-model checkpoint with optimizer state: ~1.6 GB
            },
        )
    with open_dict(ctx.raw_config):  # new keys under typed dicts (data.components.*), still type-checked
        cfg = OmegaConf.merge(ctx.raw_config, over)
    OmegaConf.set_struct(cfg, True)
    return cfg


def margin(ctx, name: str, data_dir: Path, models_dir: Path) -> float:
    """The first-token margin of one of the quickstart's models on the evaluation pairs."""
    from deepalign.kl import first_token_margin
    from deepalign.models import load_model

    cfg = ctx.config.model
    if name != "unaligned":
        path = str(models_dir / name / "model")
        cfg = dataclasses.replace(cfg, source="hf", path=path, tokenizer=None, adapter_path=None)
    loaded = load_model(cfg)
    pairs = [(r["prompt"], r["harmful"]) for _, r in read_rows(str(data_dir / "eval_harmful.jsonl"), "eval")]
    return round(first_token_margin(loaded.model, loaded.tokenizer, pairs, refusal_templates()), 4)


def run_quickstart(ctx) -> dict[str, float]:
    from deepalign.cli import run as run_config
    from deepalign.report import write_report

    q = ctx.config.quickstart
    out = ctx.run_dir / "quickstart"
    data_dir, models_dir = out / "data", ctx.run_dir / "models"
    timing_file = out / "harvest_time.json"  # the first (real) harvest's duration and speed survive re-runs
    start = time.perf_counter()
    metrics = harvest(ctx, data_dir)
    speed = metrics.pop(HARVEST_THROUGHPUT, None)
    if not timing_file.is_file():
        first = {"seconds": round(time.perf_counter() - start, 1), "gen_tokens_per_s": speed}
        write_text_atomic(timing_file, json.dumps(first))
    first = json.loads(timing_file.read_text())
    metrics["time/quickstart/harvest_s"] = first["seconds"]
    if first.get("gen_tokens_per_s") is not None:
        metrics[HARVEST_THROUGHPUT] = first["gen_tokens_per_s"]
    ctx.forget_model()  # each sub-run loads its own
    names = models(q)
    for name in names:
        log.info("quickstart: model %s", name)
        sub = run_config(sub_config(ctx, name, data_dir, models_dir), models_dir / name)
        metrics.update({f"{name}/{k}": v for k, v in sub.items()})
        # the sub-run's own stage times, recorded when each stage really ran
        seconds = sum(v for k, v in sub.items() if k.startswith("time/"))
        metrics[f"time/quickstart/{name}_s"] = round(seconds, 1)
    start = time.perf_counter()
    for name in names:
        metrics[f"{name}/margin/first_token"] = margin(ctx, name, data_dir, models_dir)
    metrics["time/quickstart/margin_s"] = round(time.perf_counter() - start, 1)
    write_report(ctx.run_dir, metrics, names, ctx.tracker)
    return metrics
