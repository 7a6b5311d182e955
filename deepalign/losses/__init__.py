"""Token-wise constrained fine-tuning loss (Qi et al. 2024), per masked response token t:
(2 / beta_t) * -log sigmoid(beta_t * (log pi(y_t) - log pi_aligned(y_t))), plus the plain SFT loss.

Both are registered losses (`loss.name=sft|constrained`): `fn(inputs, params)` -> loss, or (loss, logs), with
`inputs` a `deepalign.losses.inputs.LossInputs` (see `deepalign.plugins.LossSpec`). The constrained loss's
setting is the `loss.beta` schedule, which it asks for with `needs=("reference", "beta")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from deepalign.config import BetaSchedule
from deepalign.losses.inputs import LossInputs
from deepalign.plugins import register_loss

PAPER_BETA = BetaSchedule()  # the paper's schedule: the schema's defaults


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_length(length: int) -> None:
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length!r}")


def beta_schedule(
    length: int,
    first: float = PAPER_BETA.first,
    prefix: float = PAPER_BETA.prefix,
    prefix_len: int = PAPER_BETA.prefix_len,
    rest: float = PAPER_BETA.rest,
) -> torch.Tensor:
    """Float32 betas for positions 1..length: `first` at 1, `prefix` at 2..prefix_len, `rest` after."""
    _check_length(length)
    _check_positive("first", first)
    _check_positive("prefix", prefix)
    _check_positive("rest", rest)
    if prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1, got {prefix_len!r}")
    betas = torch.full((length,), float(rest), dtype=torch.float32)
    betas[1:prefix_len] = float(prefix)
    betas[:1] = float(first)
    return betas


def beta_schedule_from_values(length: int, values: Sequence[float], rest: float) -> torch.Tensor:
    """Float32 betas: `values` for positions 1..len(values) (truncated to `length`), `rest` after."""
    _check_length(length)
    _check_positive("rest", rest)
    for i, v in enumerate(values):
        _check_positive(f"values[{i}]", v)
    betas = torch.full((length,), float(rest), dtype=torch.float32)
    head = [float(v) for v in values[:length]]
    if head:
        betas[: len(head)] = torch.tensor(head, dtype=torch.float32)
    return betas


def schedule_for(beta: BetaSchedule, length: int) -> torch.Tensor:
    """The configured per-position betas (`loss.beta`) for response positions 1..length."""
    if beta.values is not None:
        return beta_schedule_from_values(length, list(beta.values), beta.rest)
    return beta_schedule(length, beta.first, beta.prefix, beta.prefix_len, beta.rest)


def response_positions(mask: torch.Tensor) -> torch.Tensor:
    """1-based position of each masked token among the masked tokens of its row (long), 0 where unmasked."""
    mask = mask.bool()
    return torch.cumsum(mask.long(), dim=-1) * mask


def betas_for_mask(mask: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    """[batch, seq] betas: schedule[pos - 1] at masked tokens (schedule[-1] past its end), 0 elsewhere."""
    mask = mask.bool()
    schedule = torch.as_tensor(schedule, device=mask.device)
    if schedule.dim() != 1:
        raise ValueError(f"schedule must be 1-D, got shape {tuple(schedule.shape)}")
    if not schedule.is_floating_point():
        schedule = schedule.float()
    if schedule.numel() == 0:
        if bool(mask.any()):
            raise ValueError("schedule is empty but mask has target tokens")
        return torch.zeros(mask.shape, dtype=schedule.dtype, device=mask.device)
    idx = (response_positions(mask) - 1).clamp(0, schedule.numel() - 1)
    return torch.where(mask, schedule[idx], torch.zeros((), dtype=schedule.dtype, device=mask.device))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _normalise(
    total: torch.Tensor, mask: torch.Tensor, num_target_tokens: float | torch.Tensor | None
) -> torch.Tensor:
    """total / num_target_tokens (or / mask.sum()); a zero count divides by 1 so the loss stays 0, not NaN."""
    if num_target_tokens is None:
        denom = mask.sum().to(total.dtype)
    elif isinstance(num_target_tokens, torch.Tensor):
        denom = num_target_tokens.detach().to(device=total.device, dtype=total.dtype)
    else:
        if num_target_tokens < 0:
            raise ValueError(f"num_target_tokens must be >= 0, got {num_target_tokens!r}")
        denom = torch.tensor(float(num_target_tokens), dtype=total.dtype, device=total.device)
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


def constrained_token_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    mask: torch.Tensor,
    betas: torch.Tensor,
    num_target_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over masked tokens of (2/beta) * -logsigmoid(beta * (policy - reference)), / num_target_tokens.

    Defaults to the mean over masked tokens; gradient per token is -2 * sigmoid(beta * (reference - policy)).
    """
    mask = mask.bool()
    dtype = _compute_dtype(policy_logps)
    zero = torch.zeros((), dtype=dtype, device=policy_logps.device)
    one = torch.ones((), dtype=dtype, device=policy_logps.device)
    diff = torch.where(mask, policy_logps.to(dtype) - reference_logps.detach().to(dtype), zero)
    beta = torch.where(mask, betas.to(dtype), one)
    per_token = (2.0 / beta) * -F.logsigmoid(beta * diff)
    total = torch.where(mask, per_token, zero).sum()
    return _normalise(total, mask, num_target_tokens)


def sft_loss(
    policy_logps: torch.Tensor, mask: torch.Tensor, num_target_tokens: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Token NLL: sum of -policy_logps over masked tokens / num_target_tokens (default: / mask.sum())."""
    mask = mask.bool()
    dtype = _compute_dtype(policy_logps)
    zero = torch.zeros((), dtype=dtype, device=policy_logps.device)
    total = torch.where(mask, -policy_logps.to(dtype), zero).sum()
    return _normalise(total, mask, num_target_tokens)


@torch.no_grad()
def token_weights(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, betas: torch.Tensor
) -> torch.Tensor:
    """Detached per-token gradient weight w_t = 2 * sigmoid(beta * (reference - policy)), [batch, seq]."""
    dtype = _compute_dtype(policy_logps)
    diff = reference_logps.to(dtype) - policy_logps.to(dtype)
    return 2.0 * torch.sigmoid(betas.to(dtype) * torch.nan_to_num(diff))


def weights_by_position(
    weights: torch.Tensor, mask: torch.Tensor, max_position: int = 10
) -> dict[int, float]:
    """Mean weight over the batch at each response position 1..max_position that occurs in the mask."""
    if max_position < 1:
        raise ValueError(f"max_position must be >= 1, got {max_position!r}")
    pos = response_positions(mask)
    keep = (pos >= 1) & (pos <= max_position)
    idx = pos[keep] - 1
    vals = weights.detach()[keep].double()
    sums = torch.zeros(max_position, dtype=torch.float64, device=vals.device).index_add_(0, idx, vals)
    counts = torch.bincount(idx, minlength=max_position)
    return {
        k + 1: s / c for k, (s, c) in enumerate(zip(sums.tolist(), counts.tolist(), strict=True)) if c > 0
    }


@register_loss("sft")
def sft(inputs: LossInputs, params: dict[str, Any]) -> torch.Tensor:
    """Plain supervised fine-tuning: token NLL over the target tokens."""
    return sft_loss(inputs.policy_logps, inputs.mask, inputs.n_tokens)


@register_loss("constrained", needs=("reference", "beta"))
def constrained(inputs: LossInputs, params: dict[str, Any]):
    """The token-wise constrained objective with the `loss.beta` schedule; logs the mean token weight w_t at
    response positions 1..10 (`train/weight/pos=N`)."""
    policy_logps, mask = inputs.policy_logps, inputs.mask.bool()
    reference_logps = inputs.reference_logps.to(policy_logps.device)
    betas = betas_for_mask(mask, schedule_for(inputs.beta, mask.shape[1])).to(policy_logps.device)
    loss = constrained_token_loss(policy_logps, reference_logps, mask, betas, inputs.n_tokens)
    weights = token_weights(policy_logps.detach(), reference_logps, betas)
    logs = {f"weight/pos={p}": w for p, w in weights_by_position(weights, mask, max_position=10).items()}
    return loss, logs
