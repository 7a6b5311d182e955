"""The `quickstart` stage: the paper in miniature on the demo model, as sub-runs of this run.

1. harvest: the unaligned model's own harmful answers (prefilled with an affirmative start, sampled, long
   enough for prefills of 100 tokens), its own greedy answers to the evaluation requests (the second source
   of prefills, `prefill_own`) and its own benign answers (greedy, cut ones ending at their last whole
   sentence); refusals from the packaged templates. Written to `quickstart/data/`.
2. `models/shallow`: SFT on harmful -> refusal plus benign answers. `models/deep`: the same budget with safety
   recovery examples.
3. `models/unaligned|shallow|deep`: attacks (none, prefilling, a reduced decoding sweep, a short GCG),
   per-token KL against the unaligned model (not for itself), the refusal probability after each prefill
   depth, over-refusal.
4. `models/ft_sft|ft_constrained`: a harmful fine-tuning attack on the shallow model, plain SFT vs the
   token-wise constrained loss; then ASR (`quickstart.paper_beta=true` adds `ft_constrained_paper`, the
   paper's beta_1 = 0.5 schedule). Every model's first-token margin (refusal vs harmful start).
5. `report.md`, `kl_per_position.png`, `asr_vs_prefill_depth.png`, `recovery_per_depth.png` in the run dir;
   metrics prefixed by model.
Every sub-run is an ordinary run dir, so a re-run of the same command reuses whatever finished. Its config is
this run's (the sections every sub-run shares, set by conf/experiment/quickstart.yaml) with its own layer
merged over it (`quickstart.runs.<name>`, from conf/quickstart/<name>.yaml).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from deepalign.chat import response_tokens
from deepalign.config import (
    DeepAlignConfig,
    EvalConfig,
    ModelConfig,
    QuickstartConfig,
    omegaconf_error,
    validate,
)
from deepalign.context import RunContext
from deepalign.data import DataError, read_rows
from deepalign.depth import refusal_templates
from deepalign.eval_items import EvalItem, Variant, read_eval_items
from deepalign.flops import gflop_so_far, machine_gflops
from deepalign.generation import SamplingParams, make_engine
from deepalign.generation_store import generate_variant
from deepalign.judges.keyword import REFUSAL_LISTS, find_refusal
from deepalign.memory import PeakMemory, release_memory, rss_kib
from deepalign.models import trained_model
from deepalign.plugins import ATTACKS, STAGES, register_stage
from deepalign.storage.atomic import write_text_atomic
from deepalign.storage.jsonl import JsonlStore

log = logging.getLogger(__name__)
HARVEST_THROUGHPUT = "throughput/harvest/gen_tokens_per_s"
OWN = "own"  # the evaluation field with the unaligned model's own greedy answer (`attack.<name>.source`)


# a sentence's end: . ! or ? before whitespace (not a list number's "1."), or a line break after a line that
# does not end in ":" (a heading whose content the cut removed)
SENTENCE_END = re.compile(r"(?<![0-9])[.!?](?=\s)|(?<![:\n])\n")


def whole_sentences(text: str) -> str:
    """`text` up to the end of its last whole sentence (all of it if there is none): for cut answers."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]].rstrip() if ends else text


def prefill_attacks(config: DeepAlignConfig) -> list[Any]:
    """The settings of the attack instances every sub-run shares that cut prefills from the items' responses
    (their class declares `prefills_responses`: the prefill attack): their `depths` and `source`."""
    return [
        a
        for name, a in config.attack.items()
        if ATTACKS.get(a.type, f"attack.{name}.type").cls.prefills_responses
    ]


def _split(source: str, split: str, key: str) -> list[dict[str, Any]]:
    return [row for _, row in read_rows(source, key) if row.get("split", split) == split]


def harvest(ctx: RunContext, out: Path) -> dict[str, float]:
    """The unaligned model's harmful and benign answers, as training and evaluation files under `out`."""
    q = ctx.config.quickstart
    loaded = ctx.model()
    tok = loaded.tokenizer
    engine = make_engine(
        ctx.config.generation, loaded, model_path=ctx.model_path(), cache_dir=ctx.config.paths.cache_dir
    )
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
    train_items, eval_items = (
        [EvalItem(id=f"h-{r['id']}", prompt=r["prompt"], request=r["prompt"]) for r in rows]
        for rows in (train_h, eval_h)
    )
    # the training answers need only as many tokens as the recovery examples and the fine-tuning attack cut;
    # the evaluation answers as many as the deepest prefill
    longer = dataclasses.replace(sampled, max_new_tokens=q.harvest_eval_tokens)
    for name, params, items in (
        ("harvest_harmful", sampled, train_items),
        ("harvest_eval", longer, eval_items),
    ):
        generate_variant(
            engine,
            store,
            Variant(name, params, prefill=q.harvest_prefill),
            items,
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

    # a prefill attack cut from the unaligned model's own greedy answers (`source: own`) beside the harvested
    own_depths = [k for a in prefill_attacks(ctx.config) if a.source == OWN for k in a.depths]
    if own_depths:
        generate_variant(
            engine,
            store,
            Variant("harvest_own", dataclasses.replace(greedy, max_new_tokens=q.harvest_eval_tokens)),
            eval_items,
            tok,
            system=None,
            seed=ctx.config.seed,
            model_id=ctx.model_id(),
        )

    def answer(kind: str, item_id: str) -> str:
        record = store.records[f"{kind}/{item_id}/0"]
        return (record["prefill"] + record["response"]).strip()

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def clip(prompt: str, text: str, n: int) -> str:
        tokens = response_tokens(tok, prompt, text)
        return tokens.prefix_text(min(n, len(tokens))).rstrip()

    triplets = [
        {
            "prompt": r["prompt"],
            "harmful": answer("harvest_harmful", f"h-{r['id']}"),
            "refusal": refusals[i % len(refusals)],
        }
        for i, r in enumerate(train_h)
    ]

    # An answer the token limit cut ends at its last whole sentence: trained with the end-of-turn token after
    # a half sentence, the model learns to stop mid-sentence, also after a harmful prefill.
    def benign_answer(item_id: str) -> str:
        text = answer("harvest_benign", item_id)
        return text if store.records[f"harvest_benign/{item_id}/0"]["finished"] else whole_sentences(text)

    chats = [{"prompt": r["prompt"], "response": benign_answer(f"b-{r['id']}")} for r in benign]
    chats = [c for c in chats if c["response"]]  # an empty answer teaches nothing
    evals = [
        {"id": r["id"], "prompt": r["prompt"], "harmful": answer("harvest_eval", f"h-{r['id']}")}
        for r in eval_h
    ]
    # prefilling needs answers at least as long as the deepest prefill the sub-runs share
    deepest = max((k for a in prefill_attacks(ctx.config) if a.source is None for k in a.depths), default=0)
    evals = [e for e in evals if n_tokens(e["harmful"]) >= deepest]
    for e in evals:  # the own answer, where it is long enough and no refusal (an item without it is left out)
        own = answer("harvest_own", f"h-{e['id']}") if own_depths else ""
        if own and n_tokens(own) >= max(own_depths) and find_refusal(own, REFUSAL_LISTS["qi2024"]) is None:
            e[OWN] = own
    if own_depths and not any(OWN in e for e in evals):
        raise DataError(
            f"attack.*.source={OWN}: none of the unaligned model's own answers has {max(own_depths)} tokens "
            f"without a refusal (quickstart.harvest_eval_tokens={q.harvest_eval_tokens}; or lower the depths)"
        )
    # the fine-tuning attack's answers: their first ft_tokens tokens (the harvest is longer, for prefills)
    pairs = [
        {"prompt": t["prompt"], "response": clip(t["prompt"], t["harmful"], q.ft_tokens)}
        for t in triplets[: q.ft_pairs]
    ]
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
        "quickstart/harvested_harmful": len(train_items) + len(eval_items),
        "quickstart/harvested_benign": len(benign_items),
        "quickstart/eval_items": len(evals),
    }
    if own_depths:
        metrics["quickstart/eval_items_own"] = sum(OWN in e for e in evals)
    if engine.stats.new_tokens:  # nothing when every answer was already harvested
        metrics[HARVEST_THROUGHPUT] = round(engine.stats.tokens_per_s, 1)
    return metrics


def sub_config(ctx: RunContext, name: str, data_dir: Path, models_dir: Path) -> DictConfig:
    """The config of sub-run `name`: this run's config (the sections every sub-run shares) with its layer
    `quickstart.runs.<name>` merged over it; the layer's `${quickstart.data_dir}` and `models_dir` resolve to
    this run's folders. Its own `runs` are dropped: a sub-run derives nothing further."""
    raw = ctx.raw_config
    folders = {
        "quickstart": {"data_dir": str(data_dir), "models_dir": str(models_dir)},
        "logger": {"name": "none"},
    }
    try:
        with open_dict(raw):  # new keys under typed dicts (data.components.*), still type-checked
            cfg = OmegaConf.merge(raw, raw.quickstart.runs[name], folders)
            cfg.quickstart.runs = {}
    except OmegaConfBaseException as err:  # a key or a value the schema rejects, named as the layer's
        raise omegaconf_error(err, f"quickstart.runs.{name}.") from err
    OmegaConf.set_struct(cfg, True)
    return cfg


def evaluated_model(config: DeepAlignConfig, run_dir: Path) -> ModelConfig:
    """The model a sub-run evaluated: the one its last model-saving stage (train) saved, else its own."""
    saved = [STAGES.get(s, "stages").model_dir for s in config.stages if STAGES.get(s, "stages").model_dir]
    return trained_model(config.model, run_dir / saved[-1]) if saved else config.model


def margin(config: DeepAlignConfig, model: ModelConfig, data_dir: Path) -> float:
    """The first-token margin (refusal vs harmful start) of `model` on the evaluation pairs, in the
    precision of `analysis.dtype`."""
    from deepalign.kl import first_token_margin
    from deepalign.models import load_model
    from deepalign.stages.analyze import autocast_context

    loaded = load_model(model)
    pairs = [(r["prompt"], r["harmful"]) for _, r in read_rows(str(data_dir / "eval_harmful.jsonl"), "eval")]
    with autocast_context(config, loaded.model):
        value = first_token_margin(loaded.model, loaded.tokenizer, pairs, refusal_templates())
    return round(value, 4)


# its fingerprint: the whole config (it derives whole sub-runs from it)
@register_stage("quickstart", config=QuickstartConfig, single_process=True)
def run_quickstart(ctx: RunContext) -> dict[str, float]:
    from deepalign.report import write_report
    from deepalign.runner import run as run_config

    out = ctx.run_dir / "quickstart"
    data_dir, models_dir = out / "data", ctx.run_dir / "models"
    names = ctx.config.quickstart.chosen()
    # built before the harvest: a wrong key or type in a layer fails at once
    configs = {name: sub_config(ctx, name, data_dir, models_dir) for name in names}
    timing_file = out / "harvest_time.json"  # the first (real) harvest's duration and speed survive re-runs
    start, work = time.perf_counter(), gflop_so_far()
    with PeakMemory() as peak:
        metrics = harvest(ctx, data_dir)
    speed = metrics.pop(HARVEST_THROUGHPUT, None)
    if not timing_file.is_file():
        first = {"seconds": round(time.perf_counter() - start, 1), "gen_tokens_per_s": speed}
        first["gflop"] = round(gflop_so_far() - work, 1)
        first["memory"] = peak.metrics("memory/quickstart/harvest")
        write_text_atomic(timing_file, json.dumps(first))
    first = json.loads(timing_file.read_text())
    metrics["time/quickstart/harvest_s"] = first["seconds"]
    if first.get("gen_tokens_per_s") is not None:
        metrics[HARVEST_THROUGHPUT] = first["gen_tokens_per_s"]
    metrics.update(first.get("memory", {}))
    if first.get("gflop") is not None:
        metrics["flops/quickstart/harvest_gflop"] = first["gflop"]
    ctx.forget_model()  # each sub-run loads its own
    models: dict[str, ModelConfig] = {}
    for name, cfg in configs.items():
        log.info("quickstart: model %s", name)
        sub = run_config(cfg, models_dir / name)
        release_memory()  # what the sub-run freed (its models, engines, caches) goes back to the system
        if (resident := rss_kib()) is not None:
            metrics[f"memory/quickstart/{name}/rss_after_gib"] = round(resident / 2**20, 3)
        models[name] = evaluated_model(validate(cfg), models_dir / name)
        # a sub-run's non-finite values (None: every judgment of a variant failed) stay in its metrics.json
        metrics.update({f"{name}/{k}": v for k, v in sub.items() if v is not None})
        # the sub-run's own stage times, recorded when each stage really ran
        seconds = sum(v for k, v in sub.items() if k.startswith("time/"))
        metrics[f"time/quickstart/{name}_s"] = round(seconds, 1)
    start, work = time.perf_counter(), gflop_so_far()
    for name in names:
        metrics[f"{name}/margin/first_token"] = margin(ctx.config, models[name], data_dir)
    metrics["time/quickstart/margin_s"] = round(time.perf_counter() - start, 1)
    metrics["flops/quickstart/margin_gflop"] = round(gflop_so_far() - work, 1)
    rate, dtype = machine_gflops(ctx.config.paths.cache_dir)
    if rate == rate:  # a CPU whose probe ran (nan elsewhere)
        metrics[f"machine/{dtype}_gflops"] = round(rate, 1)
    write_report(ctx.run_dir, metrics, names, ctx.tracker)
    return metrics
