"""The `analyze` stage: per-token KL(model || reference) on harmful (prompt, response) pairs (paper Fig. 1).

The model is the run's model (the trained one once `train` is done); the reference is `analysis.reference`,
or the run's initial model. Writes `analysis/kl.json` and `analysis/kl.png`; metrics `kl/pos=1..N`.
"""

from __future__ import annotations

import dataclasses

from deepalign.attacks import read_eval_items
from deepalign.data import DataError
from deepalign.kl import per_position_loss_and_grad_norm, per_token_kl, plot_per_position
from deepalign.models import load_model
from deepalign.rundir import write_json_atomic


def run_analyze(ctx) -> dict[str, float]:
    cfg = ctx.config
    pairs = [(i.prompt, i.harmful) for i in read_eval_items(cfg.eval) if i.harmful]
    if not pairs:
        raise DataError(
            "eval.prompts: per-token KL needs harmful responses (a `harmful` field) and none has one"
        )
    loaded = ctx.model()
    if cfg.analysis.reference:
        ref_cfg = dataclasses.replace(
            cfg.model, source="hf", path=cfg.analysis.reference, tokenizer=None, adapter_path=None
        )
    else:
        ref_cfg = cfg.model  # the run's initial model
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
