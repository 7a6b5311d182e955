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
from dataclasses import dataclass
from typing import Any

import torch

from deepalign.errors import ConfigError
from deepalign.plugins import register_loss, typed_settings


@dataclass
class KlSftConfig:
    """The settings of kl_sft (`loss.params`). `kl_coef` has no default here: conf/loss/kl_sft.yaml holds it,
    the one place."""

    kl_coef: float  # the weight of the squared log-ratio; 0 is plain SFT

    def check(self, key: str = "loss.params") -> None:
        value = self.kl_coef
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}.kl_coef: must be a number >= 0, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key}.kl_coef: must be a finite number >= 0, got {value!r}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> KlSftConfig:
        """The settings out of the params a five-argument loss receives (`loss.params` plus `beta`)."""
        return typed_settings(cls, params, "loss.params", "loss kl_sft", ignore_unknown=True)


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


@register_loss("kl_sft", needs=("reference",), config=KlSftConfig)
def kl_sft(policy_logps, reference_logps, mask, n_tokens, params: dict[str, Any]):
    """SFT plus kl_coef / 2 * (log pi - log pi_ref)^2 per target token; logs `kl_penalty`, the mean penalty
    per target token of the batch. The five-argument signature: callable on plain tensors and a dict."""
    settings = KlSftConfig.from_params(params)
    loss, penalty = kl_sft_loss(policy_logps, reference_logps, mask, n_tokens, float(settings.kl_coef))
    count = int(mask.sum())
    return loss, {"kl_penalty": float(penalty.sum()) / count if count else 0.0}
