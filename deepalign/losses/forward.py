"""The forward passes that give a loss its `LossInputs` for one micro-batch.

Always the target log-probs of the model being trained (chunked, deepalign/logprobs.py); besides, only
what the loss names in `needs`: the hidden states and the log-probs of chosen token ids come from the same
forward pass, the log-probs without the PEFT adapter from a second one. A packed batch (`train.packing`)
is scored as one row and cut back into sequences, so the loss sees the same tensors as without packing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import torch

from deepalign.errors import ConfigError
from deepalign.logprobs import logprobs_at, target_logprobs, unwrap
from deepalign.losses.inputs import LossInputs

log = logging.getLogger(__name__)
# Mean |log-prob difference| per target token between a packed and a padded batch above which packing is
# refused, in float32 (True) and under bf16/fp16: rounding stays below (float32: ~1e-7), attention leaking
# across sequences goes above (0.007 nats even in a tiny random model, whose outputs are nearly uniform).
PACKING_TOLERANCE = {True: 1e-4, False: 0.05}


def unpack(packed: torch.Tensor, lengths: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """[1, total, ...] values of sequences packed end to end -> [sequences, longest, ...], right-padded
    with `fill`."""
    pieces = packed[0].split(lengths.tolist())
    return torch.nn.utils.rnn.pad_sequence(list(pieces), batch_first=True, padding_value=fill)


@torch.no_grad()
def check_packing(
    model,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    packed: torch.Tensor,
    mask: torch.Tensor,
    chunk_mib: float,
) -> float:
    """Score a packed batch again padded, one sequence per row; return the mean |difference| of the target
    log-probs. Raises when they differ by more than rounding: the model's attention crosses the boundaries
    of packed sequences (an attention implementation or remote code that ignores packed position ids)."""
    padded_mask = unpack(mask, lengths, False)
    logps, _ = target_logprobs(
        model,
        unpack(ids, lengths),
        attention_mask=unpack(torch.ones_like(ids), lengths),
        target_mask=padded_mask,
        chunk_mib=chunk_mib,
    )
    diff = (unpack(packed, lengths) - logps)[padded_mask].abs()
    mean = float(diff.mean()) if diff.numel() else 0.0
    exact = not torch.is_autocast_enabled(ids.device.type) and unwrap(model).dtype == torch.float32
    if mean > PACKING_TOLERANCE[exact]:
        raise ValueError(
            f"train.packing: packed sequences score {mean:.3g} nats per token away from the same sequences "
            f"padded (max {float(diff.max()):.3g}); this model's attention does not keep packed sequences "
            "apart. Set train.packing=false (or an attention implementation that reads packed position ids: "
            "model.arch / attn_implementation sdpa, eager, flash_attention_2)"
        )
    log.info("train.packing: packed vs padded log-probs differ by %.2g nats per token", mean)
    return mean


def adapter_model(model: Any) -> Any | None:
    """The PEFT model inside `model`'s DDP / DeepSpeed / torch.compile wrappers (the one whose
    `disable_adapter()` turns its adapters off), or None when it has none."""
    while model is not None:
        if callable(getattr(model, "disable_adapter", None)):
            return model
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(getattr(model, "module", None), torch.nn.Module):
            inner = model.module
        model = inner
    return None


def check_adapter(model: Any, loss: str) -> None:
    """A loss that needs "no_adapter" trains a model with a PEFT adapter; else a ConfigError, before any
    step."""
    if adapter_model(model) is None:
        raise ConfigError(
            f"loss.name: loss {loss} needs no_adapter, the log-probs with the PEFT adapter disabled, but "
            f"{type(unwrap(model)).__name__} has no adapter; train it with train=lora"
        )


def loss_inputs(
    model: Any,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    *,
    needs: Collection[str],
    chunk_mib: float,
    n_tokens: torch.Tensor | int | None = None,
    config: Any = None,
    beta: Any = None,
    check_packed: bool = False,
) -> tuple[LossInputs, Any]:
    """(the loss's inputs, the model's output) for `batch` (from `training.Collator`), `mask` its target
    tokens: the forward passes that `needs` asks for (see `LossInputs`; "logits_at" scores the ids in
    `config.logits_at`), `n_tokens` the step's target tokens (None: this batch's), the loss's typed
    `config` and `beta` schedule (kept where `needs` asks for it). `check_packed`: score a packed batch
    padded too (`check_packing`)."""
    hidden = "hidden_states" in needs or "logits_at" in needs
    ids = batch["input_ids"]
    packed = "seq_lengths" in batch  # one row, sequences told apart by their position ids
    where = {"position_ids": batch["position_ids"]} if packed else {"attention_mask": batch["attention_mask"]}
    policy, outputs = target_logprobs(
        model, ids, **where, target_mask=mask, chunk_mib=chunk_mib, output_hidden_states=hidden
    )
    if packed and check_packed:
        check_packing(model, ids, batch["seq_lengths"], policy.detach(), mask, chunk_mib)
    no_adapter = None
    if "no_adapter" in needs:
        with torch.no_grad(), adapter_model(model).disable_adapter():
            no_adapter, _ = target_logprobs(model, ids, **where, target_mask=mask, chunk_mib=chunk_mib)
    at = logprobs_at(model, outputs, config.logits_at, chunk_mib) if "logits_at" in needs else None
    states = tuple(outputs.hidden_states) if "hidden_states" in needs else None
    reference = batch.get("reference_logps")
    if packed:  # the loss sees the same [sequences, length] tensors as without packing
        lengths = batch["seq_lengths"]
        policy, mask = unpack(policy, lengths), unpack(mask, lengths, False)
        reference = unpack(reference, lengths) if reference is not None else None
        no_adapter = unpack(no_adapter, lengths) if no_adapter is not None else None
        states = tuple(unpack(h, lengths) for h in states) if states is not None else None
        if at is not None:  # each sequence's first token is predicted by the one before it: 0, as unpacked
            at = unpack(at, lengths)
            at = torch.cat([torch.zeros_like(at[:, :1]), at[:, 1:]], dim=1)
    inputs = LossInputs(
        policy,
        mask,
        n_tokens if n_tokens is not None else mask.sum(),
        reference_logps=reference,
        hidden_states=states,
        logits_at=at,
        no_adapter_logps=no_adapter,
        beta=beta if "beta" in needs else None,
        config=config,
    )
    return inputs, outputs
