"""The `train` stage: build the data mixture, cache reference log-probs if needed, fine-tune, save.

The trained model is saved to `<run_dir>/model` (and the LoRA adapter to `<run_dir>/adapter`); later
stages of the run load it from there. Checkpoints go to `<run_dir>/checkpoints`: starting the same run
again resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deepalign.chat import NoLabelError, encode_for_training
from deepalign.config import DeepAlignConfig
from deepalign.context import RunContext
from deepalign.data import DataError, build_mixture, read_component, recovery_histogram
from deepalign.models import resolve_device
from deepalign.plugins import LOSSES, register_stage
from deepalign.precision import train_bf16
from deepalign.reference import cached_reference_logps, model_fingerprint
from deepalign.storage.atomic import write_json_atomic, write_text_atomic
from deepalign.training import TokenDataset, TokensAtStart, train

log = logging.getLogger(__name__)


def encode_examples(examples, tokenizer, max_length: int):
    """Tokenized examples with label masks, and the examples kept (in the same order); those with no target
    token left after truncation are dropped."""
    encoded, kept = [], []
    for e in examples:
        try:
            encoded.append(
                encode_for_training(
                    tokenizer,
                    e.prompt,
                    e.response,
                    system=e.system,
                    prefill=e.prefill,
                    prefill_ids=e.prefill_ids or None,
                    max_length=max_length,
                )
            )
        except NoLabelError:
            continue
        kept.append(e)
    dropped = len(examples) - len(kept)
    if dropped:
        log.warning(
            "%d of %d examples had no target token within data.max_length=%d and were dropped",
            dropped,
            len(examples),
            max_length,
        )
    if not encoded:
        raise ValueError(
            f"data.max_length: every example is longer than {max_length} tokens before its response"
        )
    return encoded, kept


def check_training_data(config: DeepAlignConfig, tokenizer: Callable[[], Any]) -> None:
    """Before any model loads: training data is configured, and its local and packaged components read
    row by row (hub sets are read by the stage)."""
    if not config.data.components:
        raise DataError("data.components: no training data configured (choose a data= preset)")
    for name, comp in config.data.components.items():
        local = Path(comp.source).suffix.lower() in (".jsonl", ".json", ".csv")
        if local or comp.source.startswith("demo:"):
            read_component(comp, f"data.components.{name}")


def resolved_precision(ctx: RunContext) -> dict[str, Any]:
    """For the stage's fingerprint: what `train.bf16=auto` resolves to on this machine
    (deepalign/precision.py), so that a run moved to a machine that decides otherwise trains again."""
    c = ctx.config
    if c.train.bf16 != "auto":
        return {}
    return {"bf16": train_bf16("auto", resolve_device(c.model.device), c.paths.cache_dir)}


@register_stage(
    "train",
    sections=("model", "data", "loss", "train", "seed"),
    model_dir="model",
    ranks="all",  # every rank trains its share of each batch
    preflight=check_training_data,
    fingerprint=resolved_precision,
)
def run_train(ctx: RunContext) -> dict[str, float]:
    cfg = ctx.config
    loaded = ctx.model()
    model, tokenizer = loaded.model, loaded.tokenizer
    examples, stats = build_mixture(cfg.data, tokenizer)
    encoded, kept = encode_examples(examples, tokenizer, cfg.data.max_length)
    n_target = [sum(e.labels_mask) for e in encoded]
    stats.update({"data/dropped_too_long": len(examples) - len(kept), "data/target_tokens": sum(n_target)})
    safety = {n for n, c in cfg.data.components.items() if c.safety}
    safety_tokens = sum(t for t, ex in zip(n_target, kept) if ex.component in safety)
    stats["data/alpha_tokens"] = round(safety_tokens / max(sum(n_target), 1), 4)
    ks = [e.k for e in examples if cfg.data.components[e.component].recovery]
    data_dir = ctx.run_dir / "data"
    if ks and ctx.main_process:
        write_json_atomic(data_dir / "recovery_k.json", {"histogram": recovery_histogram(ks), "k": ks})
        ctx.tracker.log({"data/recovery_k": ctx.tracker.histogram(ks)})
    if ctx.main_process:  # every rank builds the same mixture (seeded); one writes it
        write_text_atomic(
            data_dir / "examples.jsonl", "".join(json.dumps(e.__dict__) + "\n" for e in examples[:200])
        )  # a sample to inspect
    log.info("training data: %s", stats)

    bf16 = train_bf16(cfg.train.bf16, next(model.parameters()).device, cfg.paths.cache_dir)
    attention = cfg.train.attn_implementation
    if attention:  # before the reference pass: policy and reference agree at step 0
        model.set_attn_implementation(attention)
    reference = None
    if LOSSES.get(cfg.loss.name, "loss.name").needs_reference:  # cached: the reference is the initial model
        key = model_fingerprint(cfg.model, loaded.source, model, cfg.paths.cache_dir)
        reference, path, hit = cached_reference_logps(
            model,
            encoded,
            tokenizer.pad_token_id,
            cfg.paths.cache_dir,
            key,
            cfg.train.batch_size_reference,
            autocast=torch.bfloat16 if bf16 else None,  # the precision training computes in
            chunk_mib=cfg.train.logprob_chunk_mib,
        )
        stats["train/reference_cache_hit"] = int(hit)

    trainer, metrics, history = train(
        model,
        tokenizer,
        TokenDataset(encoded, reference),
        dataclasses.replace(cfg.train, bf16=bf16),
        cfg.loss,
        ctx.run_dir / "checkpoints",
        ctx.tracker,
        fingerprint=ctx.stage_fingerprint("train"),  # checkpoints resume only under the same one
    )
    if ctx.main_process:  # the Trainer's logs (losses averaged over all ranks) reach rank 0 only
        write_text_atomic(ctx.run_dir / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    if losses:
        metrics.update({"train/first_loss": round(losses[0], 6), "train/last_loss": round(losses[-1], 6)})
    metrics.update(train_throughput(trainer, history))
    nlls = [h["train/nll"] for h in history if "train/nll" in h]
    if nlls:  # comparable across losses (the constrained run's train/loss is its own objective)
        metrics.update({"train/first_nll": round(nlls[0], 6), "train/last_nll": round(nlls[-1], 6)})
    save_trained(trainer, tokenizer, cfg.train, ctx.run_dir)
    if cfg.train.deepspeed:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else later from_pretrained calls would partition weights (ZeRO-3)
    ctx.forget_model()  # later stages load the saved model
    return {**stats, **metrics}


def train_throughput(trainer, history: list[dict[str, float]]) -> dict[str, float]:
    """`throughput/train/tokens_per_s`: the non-padding input tokens of the steps trained in this call (all
    processes; the Trainer counts them, `include_num_input_tokens_seen`) over the seconds its training loop
    took (`train_runtime`). Nothing when no step was trained (a finished run reloaded)."""
    runtime = next((h["train/train_runtime"] for h in reversed(history) if "train/train_runtime" in h), None)
    at_start = [c for c in trainer.callback_handler.callbacks if isinstance(c, TokensAtStart)]
    start = at_start[0].tokens if at_start else None  # at the resumed step
    if not runtime or start is None:
        return {}
    tokens = int(trainer.state.num_input_tokens_seen - start)
    return {
        "throughput/train/tokens": tokens,
        "throughput/train/seconds": round(runtime, 3),
        "throughput/train/tokens_per_s": round(tokens / runtime, 1),
    }


def save_trained(trainer, tokenizer, cfg, run_dir) -> None:
    """The full model to run_dir/model; with LoRA, the adapter to run_dir/adapter and the merged model.

    Every rank calls it (ZeRO-3 gathers the weights); the Trainer's main process alone writes files."""
    main = trainer.args.should_save
    if cfg.method == "lora":
        trainer.save_model(str(run_dir / "adapter"))
        if cfg.lora.merge and main:
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(str(run_dir / "model"))
            tokenizer.save_pretrained(str(run_dir / "model"))
    else:
        trainer.save_model(str(run_dir / "model"))
        if main:
            tokenizer.save_pretrained(str(run_dir / "model"))
