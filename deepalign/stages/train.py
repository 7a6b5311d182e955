"""The `train` stage: build the data mixture, cache reference log-probs if needed, fine-tune, save.

The trained model is saved to `<run_dir>/model` (and the LoRA adapter to `<run_dir>/adapter`); later
stages of the run load it from there. Checkpoints go to `<run_dir>/checkpoints`: starting the same run
again resumes from the last one.
"""

from __future__ import annotations

import json
import logging

import torch

from deepalign.chat import NoLabelError, encode_for_training
from deepalign.data import build_mixture, recovery_histogram
from deepalign.reference import cached_reference_logps, model_fingerprint
from deepalign.rundir import write_json_atomic, write_text_atomic
from deepalign.training import TokenDataset, train

log = logging.getLogger(__name__)
# what the trained weights depend on: checkpoints resume only under the same (paths and evaluation may vary)
TRAINING_SECTIONS = ("model", "data", "loss", "train", "seed")


def encode_examples(examples, tokenizer, max_length: int):
    """Tokenized examples with label masks; those with no target token left after truncation are dropped."""
    encoded, dropped = [], 0
    for e in examples:
        try:
            encoded.append(
                encode_for_training(
                    tokenizer, e.prompt, e.response, system=e.system, prefill=e.prefill, max_length=max_length
                )
            )
        except NoLabelError:
            dropped += 1
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
    return encoded, dropped


def run_train(ctx) -> dict[str, float]:
    cfg = ctx.config
    loaded = ctx.model()
    model, tokenizer = loaded.model, loaded.tokenizer
    examples, stats = build_mixture(cfg.data, tokenizer)
    encoded, dropped = encode_examples(examples, tokenizer, cfg.data.max_length)
    n_target = [sum(e.labels_mask) for e in encoded]
    stats.update({"data/dropped_too_long": dropped, "data/target_tokens": sum(n_target)})
    safety = {n for n, c in cfg.data.components.items() if c.safety}
    safety_tokens = sum(t for t, ex in zip(n_target, examples) if ex.component in safety)
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

    reference = None
    if cfg.loss.name == "constrained":
        key = model_fingerprint(cfg.model, loaded.source, model)
        reference, path, hit = cached_reference_logps(
            model,
            encoded,
            tokenizer.pad_token_id,
            cfg.paths.cache_dir,
            key,
            cfg.train.batch_size_reference,
            autocast=torch.bfloat16 if cfg.train.bf16 else None,  # the precision training computes in
        )
        stats["train/reference_cache_hit"] = int(hit)

    trainer, metrics, history = train(
        model,
        tokenizer,
        TokenDataset(encoded, reference),
        cfg.train,
        cfg.loss,
        ctx.run_dir / "checkpoints",
        ctx.tracker,
        fingerprint=ctx.fingerprint_of(*TRAINING_SECTIONS),
    )
    if ctx.main_process:  # the Trainer's logs (losses averaged over all ranks) reach rank 0 only
        write_text_atomic(ctx.run_dir / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    if losses:
        metrics.update({"train/first_loss": round(losses[0], 6), "train/last_loss": round(losses[-1], 6)})
    nlls = [h["train/nll"] for h in history if "train/nll" in h]
    if nlls:  # comparable across losses (the constrained run's train/loss is its own objective)
        metrics.update({"train/first_nll": round(nlls[0], 6), "train/last_nll": round(nlls[-1], 6)})
    save_trained(trainer, tokenizer, cfg.train, ctx.run_dir)
    if cfg.train.deepspeed:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else later from_pretrained calls would partition weights (ZeRO-3)
    ctx.forget_model()  # later stages load the saved model
    return {**stats, **metrics}


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
