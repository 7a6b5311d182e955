"""The useful work of a run, counted where the model sees it, against what the machine can do.

Every model `load_model` returns counts its forward passes (a hook on its top module): a token processed
costs 2 x params FLOPs, a token of a pass that builds a graph (training, GCG's gradient) 6 x params (forward
and backward), as in the usual 6ND estimate. Padding is not counted (the attention mask's zeros); a decoding
step counts each row once. Attention's own FLOPs, quadratic in length, are left out: for the short sequences
of an alignment experiment they are a few percent. `machine_gflops` is what one linear layer of a small
model's shape runs at on this machine (the precision probe, deepalign/precision.py) times torch's threads,
in the dtype `auto` computes in: the rate a stage's GFLOP/s is compared with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_GFLOP = [0.0]  # useful GFLOP counted in this process so far


def gflop_so_far() -> float:
    """The useful GFLOP every counted model processed in this process so far."""
    return _GFLOP[0]


def count_flops(model: torch.nn.Module) -> None:
    """Count `model`'s forward passes into `gflop_so_far` (see the module docstring)."""
    params = sum(p.numel() for p in model.parameters())

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        rows, length = x.shape[0], x.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            tokens = int(mask[:, -length:].sum())
        else:
            tokens = rows * length
        _GFLOP[0] += (6 if torch.is_grad_enabled() else 2) * params * tokens / 1e9

    model.register_forward_pre_hook(hook, with_kwargs=True)


def machine_gflops(cache_dir: str | Path | None = None) -> tuple[float, str]:
    """GFLOP/s this CPU runs a small model's linear layer at, with torch's threads, and the dtype: bf16 where
    `auto` chooses bf16 autocast, else fp32 (the precision probe, cached per machine)."""
    from deepalign.precision import PROBE_SHAPE, bf16_decision

    decision = bf16_decision("cpu", cache_dir)
    probe = decision.probe or {}
    dtype = "bf16" if decision.bf16 else "fp32"
    ms = probe.get(f"{dtype}_ms")
    if not ms:
        return float("nan"), dtype
    rows, n_in, n_out = PROBE_SHAPE
    return 2 * rows * n_in * n_out / (ms * 1e-3) / 1e9 * torch.get_num_threads(), dtype
