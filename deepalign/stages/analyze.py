"""The `analyze` stage: per-token KL(model || reference) on harmful (prompt, response) pairs (paper Fig. 1).

The model is the run's model (the trained one once `train` is done); the reference is `analysis.reference`,
or the run's initial model. Writes `analysis/kl.json` and `analysis/kl.png`; metrics `kl/pos=1..N`.
"""

from __future__ import annotations

import dataclasses

from deepalign.attacks import read_eval_items
from deepalign.context import RunContext
from deepalign.data import DataError
from deepalign.kl import per_position_loss_and_grad_norm, per_token_kl, plot_per_position
from deepalign.models import load_model, model_at
from deepalign.plugins import register_stage
from deepalign.rundir import write_json_atomic


@register_stage("analyze", sections=("model", "eval", "analysis", "data.system_prompt"))
def run_analyze(ctx: RunContext) -> dict[str, float]:
    cfg = ctx.config
    pairs = [(i.prompt, i.harmful) for i in read_eval_items(cfg.eval) if i.harmful]
    if not pairs:
        raise DataError(
            "eval.prompts: per-token KL needs harmful responses (a `harmful` field) and none has one"
        )
    loaded = ctx.model()
    # the reference: analysis.reference, or the run's initial model
    ref_cfg = model_at(cfg.model, cfg.analysis.reference) if cfg.analysis.reference else cfg.model
    reference = load_model(ref_cfg).model
    a = cfg.analysis
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
    if a.grad_positions:
        model = loaded.model
        model.zero_grad(set_to_none=True)
        losses, norms = per_position_loss_and_grad_norm(
            model, loaded.tokenizer, pairs[: a.batch_size], a.grad_positions, system
        )
        model.zero_grad(set_to_none=True)
        write_json_atomic(out_dir / "loss_grad.json", {"loss": losses, "grad_norm": norms})
        metrics.update({f"loss/pos={k + 1}": round(v, 6) for k, v in enumerate(losses)})
        metrics.update({f"grad_norm/pos={k + 1}": round(v, 6) for k, v in enumerate(norms)})
    return metrics
