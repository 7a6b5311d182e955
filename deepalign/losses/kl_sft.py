"""SFT plus a per-token penalty that keeps each target token's log-prob near the aligned model's (kl_sft).

Per target token t, with d_t = log pi(y_t) - log pi_ref(y_t) and pi_ref the aligned (initial) model:

    -log pi(y_t) + kl_coef / 2 * d_t^2,

summed over the target tokens and divided by the target tokens of the optimizer step. The penalty is the
squared log-ratio at the data's own tokens: the second-order term of the per-token KL, evaluated at the
target token only. It is a cheap stand-in for the full-vocabulary KL (it needs the cached reference log-probs
of the targets, not the reference's whole distribution), not that KL itself. As a function of one token's
log-prob the objective is smallest at log pi(y_t) = log pi_ref(y_t) + 1 / kl_coef: each target token may rise
at most 1 / kl_coef nats above the aligned model. A per-token-regularised SFT baseline to compare with the
token-wise constrained loss (`loss=constrained`), whose penalty is shaped per position by beta_t instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from deepalign.errors import ConfigError
from deepalign.plugins import register_loss


def kl_coef_from(params: dict[str, Any]) -> float:
    """`loss.params.kl_coef` as a float >= 0; its default is in conf/loss/kl_sft.yaml, the one place."""
    if "kl_coef" not in params:
        raise ConfigError(
            "loss.params.kl_coef: loss kl_sft needs it (select loss=kl_sft for the default, or set "
            "++loss.params.kl_coef=VALUE)"
        )
    value = params["kl_coef"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"loss.params.kl_coef: must be a number >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"loss.params.kl_coef: must be a finite number >= 0, got {value!r}")
    return float(value)


def kl_sft_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: float | torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, penalty): the loss as in the module docstring (computed in at least float32, the reference
    detached), and the detached per-token penalty kl_coef / 2 * d_t^2, [batch, seq], 0 off the mask.

    A zero token count divides by 1, so an empty batch gives 0, not NaN."""
    mask = mask.bool()
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=policy_logps.device)
    policy = policy_logps.to(dtype)
    reference = reference_logps.detach().to(device=policy.device, dtype=dtype)
    diff = torch.where(mask, policy - reference, zero)  # off the mask 0, whatever the padding holds
    penalty = 0.5 * kl_coef * diff.square()
    total = torch.where(mask, -policy, zero).sum() + penalty.sum()
    denom = torch.as_tensor(n_tokens, device=total.device).detach().to(total.dtype)
    loss = total / torch.where(denom > 0, denom, torch.ones_like(denom))
    return loss, penalty.detach()


@register_loss("kl_sft", needs_reference=True, check=lambda params, key: kl_coef_from(params) and None)
def kl_sft(policy_logps, reference_logps, mask, n_tokens, params: dict[str, Any]):
    """SFT plus kl_coef / 2 * (log pi - log pi_ref)^2 per target token; logs `kl_penalty`, the mean penalty
    per target token of the batch."""
    loss, penalty = kl_sft_loss(policy_logps, reference_logps, mask, n_tokens, kl_coef_from(params))
    count = int(mask.sum())
    return loss, {"kl_penalty": float(penalty.sum()) / count if count else 0.0}
