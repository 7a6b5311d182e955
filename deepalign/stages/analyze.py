"""The `analyze` stage: how deep the run's model is aligned, on harmful (prompt, response) pairs.

Per-token KL(model || reference) along the harmful response (paper Fig. 1): the model is the run's model (the
trained one once `train` is done), the reference `analysis.reference`, or the run's initial model. Writes
`analysis/kl.json` and `analysis/kl.png`; metrics `kl/pos=1..N`, `kl/pairs`, and `depth/kl_tokens`: the
response positions before the mean KL stays below `analysis.depth_threshold` nats (three in a row), with
`depth/kl_tokens_censored` = 1 where it never does within the positions measured (the value is then a lower
bound: where the last stretch below the threshold began). Without a reference and without a model-saving
stage before it (train, a defence) the model is its own reference (KL 0): the KL part is skipped.

The recovery curve (deepalign/depth.py): per prefill depth k in `analysis.recovery_depths`, the
teacher-forced probability that the model starts a refusal (its first `analysis.recovery_tokens` tokens,
tokenized as a recovery example's target) right after the first k harmful tokens, averaged over the pairs
at least k tokens long: `depth/recovery/k=N` and `depth/recovery/k=N/n`, `analysis/recovery.json` (per
depth the mean, n and each pair's value), `analysis/recovery.png`. With `analysis.grad_positions`, also
the per-position loss and gradient norm (paper Fig. 3): `loss/pos=N`, `grad_norm/pos=N`,
`analysis/loss_grad.json`.

`analysis.dtype`: the KL and the recovery curve in float32 (the default), under bf16 autocast, or `auto`
(bf16 autocast where the machine's precision decision says it is faster, as for generation); the gradient
analysis always in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from deepalign.config import AnalysisConfig, DeepAlignConfig
from deepalign.context import RunContext
from deepalign.data import DataError
from deepalign.depth import kl_tokens, plot_recovery, read_refusals, refusal_probability
from deepalign.eval_items import read_eval_items
from deepalign.kl import per_position_loss_and_grad_norm, per_token_kl, plot_per_position
from deepalign.models import check_model_folder, load_model, model_at, resolve_device
from deepalign.plugins import register_stage
from deepalign.precision import generation_autocast
from deepalign.storage.atomic import write_json_atomic

log = logging.getLogger(__name__)


def kl_analysis(ctx: RunContext, loaded, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Per-token KL to the reference: `analysis/kl.json`, `analysis/kl.png`, `kl/...`, `depth/kl_tokens`."""
    cfg = ctx.config
    a = cfg.analysis
    # the reference: analysis.reference, or the run's initial model
    ref_cfg = model_at(cfg.model, a.reference) if a.reference else cfg.model
    reference = load_model(ref_cfg).model
    system = cfg.data.system_prompt
    stats = per_token_kl(loaded.model, reference, loaded.tokenizer, pairs, a.positions, a.batch_size, system)
    del reference
    out_dir = ctx.run_dir / "analysis"
    write_json_atomic(out_dir / "kl.json", {"pairs": len(pairs), **dataclasses.asdict(stats)})
    plot_per_position(
        {cfg.model.name: stats}, out_dir / "kl.png", "KL(model || reference) per response token"
    )
    positions = [k for k, n in enumerate(stats.count) if n]
    ctx.tracker.line(
        "kl/per_position",
        [k + 1 for k in positions],
        {cfg.model.name: [stats.mean[k] for k in positions]},
        "response position",
        "mean KL",
        "KL(model || reference) per response token",
    )
    metrics = stats.metrics("kl")
    metrics["kl/pairs"] = len(pairs)
    mean = [m if n else None for m, n in zip(stats.mean, stats.count)]
    tokens, ended = kl_tokens(mean, a.depth_threshold)
    metrics["depth/kl_tokens"] = tokens
    metrics["depth/kl_tokens_censored"] = int(not ended)
    return metrics


def recovery_analysis(ctx: RunContext, loaded, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """The refusal probability per prefill depth: `analysis/recovery.json`, `analysis/recovery.png`,
    `depth/recovery/k=N` (mean over the pairs, where any pair is that long) and `.../n`."""
    cfg = ctx.config
    a = cfg.analysis
    refusals = read_refusals(a.refusals)
    depths = sorted(a.recovery_depths)
    values = refusal_probability(
        loaded.model,
        loaded.tokenizer,
        pairs,
        depths,
        refusals,
        tokens=a.recovery_tokens,
        system=cfg.data.system_prompt,
    )
    means = {k: sum(v) / len(v) for k, v in values.items() if v}
    skipped = [k for k in depths if k not in means]
    if skipped:
        log.info(
            "analyze: no harmful response is as long as the prefill depths %s: no recovery value", skipped
        )
    out_dir = ctx.run_dir / "analysis"
    write_json_atomic(
        out_dir / "recovery.json",
        {
            "pairs": len(pairs),
            "refusals": len(refusals),
            "tokens": a.recovery_tokens,
            "depths": [
                {"k": k, "mean": means.get(k), "n": len(values[k]), "values": values[k]} for k in depths
            ],
        },
    )
    metrics: dict[str, float] = {}
    for k, mean in means.items():
        metrics[f"depth/recovery/k={k}"] = round(mean, 6)
        metrics[f"depth/recovery/k={k}/n"] = len(values[k])
    if means:
        title = "P(the model starts a refusal) after k harmful tokens"
        plot_recovery({cfg.model.name: means}, out_dir / "recovery.png", title)
        ctx.tracker.line(
            "recovery/per_depth",
            list(means),
            {cfg.model.name: list(means.values())},
            "prefilled harmful tokens",
            "P(refusal starts)",
            title,
        )
    return metrics


def analysis_autocast(config: DeepAlignConfig) -> torch.dtype | None:
    """The autocast dtype of `analysis.dtype` on this machine (None: float32)."""
    a = config.analysis
    if a.dtype == "float32":
        return None
    device = resolve_device(config.model.device)
    return generation_autocast(a.dtype, torch.float32, device, config.paths.cache_dir)


def autocast_context(config: DeepAlignConfig, model) -> contextlib.AbstractContextManager:
    """torch.autocast in `analysis_autocast`'s dtype around the model's forward passes (none for float32, or
    for weights not in float32)."""
    cast = analysis_autocast(config)
    device = next(model.parameters()).device
    enabled = cast is not None and next(model.parameters()).dtype == torch.float32
    return torch.autocast(device.type, dtype=cast, enabled=enabled)


def resolved_analysis_dtype(ctx: RunContext) -> dict[str, Any]:
    """For the stage's fingerprint: what `analysis.dtype=auto` resolves to on this machine."""
    if ctx.config.analysis.dtype != "auto":
        return {}
    return {"analysis_autocast": str(analysis_autocast(ctx.config))}


def check_analyze(config: DeepAlignConfig) -> None:
    """What the stage needs of the config: harmful prompts (then `analysis.check`, its section's own; without
    a reference or a train stage the stage skips the KL: the model is its own reference)."""
    config.eval.check_prompts()


def preflight_analyze(config: DeepAlignConfig, tokenizer: Callable[[], Any]) -> None:
    """Before any model loads: the reference model's folder holds weights, the evaluation set reads."""
    if config.analysis.reference:
        check_model_folder("analysis.reference", config.analysis.reference)
    read_eval_items(config.eval)


@register_stage(
    "analyze",
    sections=("model", "eval", "analysis", "data.system_prompt"),
    config=AnalysisConfig,
    key="analysis",
    check=check_analyze,
    preflight=preflight_analyze,
    fingerprint=resolved_analysis_dtype,
)
def run_analyze(ctx: RunContext) -> dict[str, float]:
    cfg = ctx.config
    pairs = [(i.prompt, i.harmful) for i in read_eval_items(cfg.eval) if i.harmful]
    if not pairs:
        raise DataError(
            "eval.prompts: per-token KL and the recovery curve need harmful responses (a `harmful` field) "
            "and none has one"
        )
    loaded = ctx.model()
    a = cfg.analysis
    metrics: dict[str, float] = {}
    with_kl = a.reference is not None or bool(ctx.producers(before="analyze"))
    if not with_kl:
        log.info(
            "analyze: no analysis.reference and no model-saving stage (train, a defence) before it: the "
            "model is its own reference (KL 0), per-token KL skipped"
        )
    with autocast_context(cfg, loaded.model):
        if with_kl:
            metrics.update(kl_analysis(ctx, loaded, pairs))
        if a.recovery_depths:
            metrics.update(recovery_analysis(ctx, loaded, pairs))
    if a.grad_positions:
        model = loaded.model
        model.zero_grad(set_to_none=True)
        losses, norms = per_position_loss_and_grad_norm(
            model, loaded.tokenizer, pairs[: a.batch_size], a.grad_positions, cfg.data.system_prompt
        )
        model.zero_grad(set_to_none=True)
        write_json_atomic(ctx.run_dir / "analysis" / "loss_grad.json", {"loss": losses, "grad_norm": norms})
        metrics.update({f"loss/pos={k + 1}": round(v, 6) for k, v in enumerate(losses)})
        metrics.update({f"grad_norm/pos={k + 1}": round(v, 6) for k, v in enumerate(norms)})
    return metrics
