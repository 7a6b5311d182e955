"""What a loss receives: one `LossInputs` per micro-batch, and the call of a registered loss with it.

A loss takes `fn(inputs, params)`; the extras it names in `register_loss(needs=...)` are filled in, the
others stay None, so nothing is computed that no loss reads. A loss with the five-argument signature
(`LossSpec.legacy`) is called as before: `fn(policy_logps, reference_logps, mask, n_tokens, params)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deepalign.plugins import LossSpec, PluginError


@dataclass
class LossInputs:
    """One micro-batch as a loss sees it; all tensors [batch, seq, ...] with one row per sequence (a packed
    batch is cut back into sequences first).

    - policy_logps: log pi(x_t | x_<t) of the model being trained at the target tokens (0 elsewhere), with
      gradients; mask: bool, the target tokens; n_tokens: the target tokens of the whole optimizer step
      (all micro-batches, all processes: divide the summed loss by it).
    - reference_logps ("reference"): the same for the initial model, cached before training.
    - beta ("beta"): the `loss.beta` schedule (a `BetaSchedule`), the constrained loss's setting.
    - hidden_states ("hidden_states"): the model's hidden states, one [batch, seq, hidden] tensor per
      layer output (the first the embeddings', the last the final layer's), with gradients.
    - logits_at ("logits_at"): [batch, seq, K] log p(config.logits_at[k] at t | x_<t), aligned as
      policy_logps (column 0 is 0), with gradients: the log-probs of chosen token ids at every position.
    - no_adapter_logps ("no_adapter"): the target log-probs with the PEFT adapter disabled (a second
      forward pass, without gradients), aligned as policy_logps.
    - config: the loss's settings, an instance of its `config` dataclass (None without one)."""

    policy_logps: torch.Tensor
    mask: torch.Tensor
    n_tokens: torch.Tensor | int | float
    reference_logps: torch.Tensor | None = None
    beta: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    logits_at: torch.Tensor | None = None
    no_adapter_logps: torch.Tensor | None = None
    config: Any = None


def call_loss(spec: LossSpec, inputs: LossInputs, params: dict[str, Any]) -> Any:
    """What the loss `spec` returns for `inputs`: `fn(inputs, params)`, or for a five-argument loss
    `fn(policy_logps, reference_logps, mask, n_tokens, params)` (its params hold `beta` too)."""
    if spec.legacy:
        return spec.fn(inputs.policy_logps, inputs.reference_logps, inputs.mask, inputs.n_tokens, params)
    return spec.fn(inputs, params)


def loss_output(spec: LossSpec, out: Any, *, needs_grad: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """What a registered loss returned, as (loss, logs), checked against its contract (`LossSpec`): a scalar
    tensor, with gradients where `needs_grad` (training), or (that, a dict of numbers); anything else is a
    PluginError naming the loss and its module, before any optimizer step."""
    where = f"loss {spec.name!r} ({spec.module}.{getattr(spec.fn, '__qualname__', spec.fn)})"
    logs: Any = {}
    if isinstance(out, tuple):
        if len(out) != 2:
            raise PluginError(f"{where} returned a tuple of {len(out)} values; return loss, or (loss, logs)")
        out, logs = out
        if not isinstance(logs, dict):
            raise PluginError(
                f"{where} returned (loss, {type(logs).__name__}); logs must be a dict name -> number"
            )
    if not isinstance(out, torch.Tensor):
        raise PluginError(
            f"{where} returned {type(out).__name__} {out!r:.60}, not a tensor: compute it from policy_logps "
            "(torch operations, no .item() or float())"
        )
    if out.dim() != 0:
        raise PluginError(
            f"{where} returned a tensor of shape {tuple(out.shape)}, not a scalar: reduce it, e.g. "
            "sum over the target tokens / n_tokens"
        )
    if needs_grad and not out.requires_grad:
        raise PluginError(
            f"{where} returned a tensor without gradient: it does not depend on policy_logps (a .detach(), "
            ".item() or torch.tensor(...) cuts it off), so training would not change the model"
        )
    return out, logs
