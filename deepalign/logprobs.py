"""Padding and per-token log-probabilities of target tokens (teacher forcing)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """A [batch, max_len] long tensor of the sequences padded on `side` ("right" or "left")."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            row = torch.as_tensor(list(s), dtype=torch.long)
            if side == "left":
                out[i, width - len(s) :] = row
            else:
                out[i, : len(s)] = row
    return out


@dataclass
class PaddedBatch:
    """A batch of token-id sequences padded to one width, as a causal LM takes it."""

    input_ids: torch.Tensor  # [batch, width] long
    attention_mask: torch.Tensor  # [batch, width] long, 1 on real tokens, 0 on padding
    labels_mask: torch.Tensor | None  # [batch, width] bool, True on target tokens; None without masks


def pad_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    side: str = "right",
    labels_masks: Sequence[Sequence[bool]] | None = None,
    device: torch.device | str | None = None,
) -> PaddedBatch:
    """Pad `seqs` with `pad_id` on `side` ("right" for teacher forcing, "left" for generation), with the
    attention mask and, if `labels_masks` (one per sequence, as long as it) are given, the padded label
    mask (False on padding). On `device` if given, else on the CPU."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    input_ids = pad_sequences(seqs, pad_id, side)
    attention_mask = pad_sequences([[1] * len(s) for s in seqs], 0, side)
    labels_mask = None
    if labels_masks is not None:
        if len(labels_masks) != len(seqs) or any(len(m) != len(s) for m, s in zip(labels_masks, seqs)):
            raise ValueError("labels_masks must give one mask per sequence, as long as the sequence")
        labels_mask = pad_sequences([[int(m) for m in mask] for mask in labels_masks], 0, side).bool()
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        labels_mask = labels_mask.to(device) if labels_mask is not None else None
    return PaddedBatch(input_ids, attention_mask, labels_mask)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t), aligned to the token (output[:, t] scores input_ids[:, t]); column 0 is 0.

    Through cross_entropy, so no second [batch, seq, vocab] tensor of log-probs is kept.
    """
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    picked = -F.cross_entropy(shifted.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


# --- Log-probs without the [batch, seq, vocab] logits ------------------------------------------------------
#
# The model runs with `logits_to_keep=1` (its output layer sees only the last position); a forward hook on
# its decoder catches the final hidden states; the output layer then scores them a chunk of tokens at a time,
# and in training each chunk is recomputed in the backward pass (activation checkpointing), so at most one
# chunk of fp32 logits is alive. Written here: no maintained library does it on a CPU for any HF model
# (liger-kernel and cut-cross-entropy are CUDA/Triton kernels for listed architectures).

LOGPROB_CHUNK_MIB = 256  # default memory for one chunk of fp32 logits (train.logprob_chunk_mib)


def unwrap(model: Any) -> Any:
    """The transformers model inside DDP / DeepSpeed / torch.compile / PEFT wrappers."""
    from transformers import PreTrainedModel

    while not isinstance(model, PreTrainedModel):
        if callable(getattr(model, "get_base_model", None)):  # PEFT
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DeepSpeedEngine
            model = model.module
        else:
            break
    return model


def cache_kwarg(model: Any) -> str:
    """The name of the KV-cache argument of `model`'s forward and `generate`: `cache` from transformers 5.2x,
    `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def _softcap(model: Any) -> float | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "final_logit_softcapping", None)


def output_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states -> logits, as the model's forward computes them: its output layer (a module call, so
    DeepSpeed ZeRO-3 gathers the weight) and the final logit soft-capping where the config has one."""
    inner = unwrap(model)
    head, cap = inner.get_output_embeddings(), _softcap(inner)
    if head is None:
        raise ValueError(
            f"{type(inner).__name__} has no output embeddings: per-token log-probs need an LM head"
        )

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden)
        return out if cap is None else torch.tanh(out / cap) * cap

    return logits


def final_hidden_states(model: Any, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """(the decoder's last hidden states [batch, seq, hidden], the model's output) of one forward pass
    through `model` (wrapped or not: DDP and DeepSpeed see their usual forward), logits only at the end."""
    decoder = unwrap(model).get_decoder()
    caught: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, out: caught.append(out[0]))
    try:
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    ids = inputs["input_ids"]
    if len(caught) != 1 or caught[0].shape[:2] != ids.shape:
        raise RuntimeError(
            f"{type(unwrap(model)).__name__}.get_decoder() ({type(decoder).__name__}) did not give one "
            f"[batch, seq, hidden] output for input ids of shape {tuple(ids.shape)}; set "
            "train.logprob_chunk_mib=0 to use the model's full logits"
        )
    return caught[0], outputs


def checked_head(model: Any, hidden: torch.Tensor, outputs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """`output_head(model)`, once it gives the model's own logits at the last position of `outputs` (from
    `final_hidden_states`): a model whose forward post-processes its logits some other way fails loudly
    instead of scoring wrong."""
    head = output_head(model)
    with torch.no_grad():
        last, expected = head(hidden[:, -1:]).float(), outputs.logits[:, -1:].detach().float()
    # non-finite logits (diverged weights) are not a head mismatch: the loss check names them
    if torch.isfinite(expected).all() and not torch.allclose(last, expected, rtol=1e-3, atol=1e-3):
        diff = float((last - expected).abs().max())
        raise ValueError(
            f"{type(unwrap(model)).__name__}: its output layer on the last hidden states differs from "
            f"the model's logits by {diff:.3g}; its forward post-processes logits in a way the chunked "
            "log-probs do not know. Set train.logprob_chunk_mib=0 to use the model's full logits."
        )
    return head


def chunk_rows(vocab: int, chunk_mib: float) -> int:
    """Tokens per chunk so that one chunk of fp32 logits takes about `chunk_mib` MiB."""
    return max(1, int(chunk_mib * 2**20) // (4 * vocab))


def _chunk_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def target_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    chunk_mib: float = LOGPROB_CHUNK_MIB,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, Any]:
    """(log p(x_t | x_<t) [batch, seq] as `token_logprobs` gives it, the model's output), one forward pass.

    With `chunk_mib` > 0 the logits are never materialised for the whole batch: only tokens where
    `target_mask` (bool [batch, seq]) is True are scored (0 elsewhere; all tokens but the first without a
    mask), `chunk_mib` MiB of fp32 logits at a time, and under autograd each chunk is recomputed in the
    backward pass. The output layer is checked against the model's own logits (`checked_head`).
    `chunk_mib=0`: the model's full logits through `token_logprobs` (the reference path).
    `output_hidden_states`: the model's output holds its hidden states too (for `logprobs_at`).
    """
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    if output_hidden_states:
        inputs["output_hidden_states"] = True
    if chunk_mib <= 0:
        outputs = model(**inputs)
        return token_logprobs(outputs.logits, input_ids), outputs
    hidden, outputs = final_hidden_states(model, **inputs)
    head = checked_head(model, hidden, outputs)
    vocab = outputs.logits.shape[-1]
    select = torch.ones_like(input_ids, dtype=torch.bool) if target_mask is None else target_mask.bool()
    select = select.clone()
    select[:, 0] = False  # nothing predicts the first token
    rows = hidden[:, :-1][select[:, 1:]]  # the hidden state before each selected token
    targets = input_ids[select]
    step = chunk_rows(vocab, chunk_mib)
    checkpointed = torch.is_grad_enabled() and rows.requires_grad
    pieces = []
    for start in range(0, targets.numel(), step):
        h, t = rows[start : start + step], targets[start : start + step]
        if checkpointed:
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, h, t))
    picked = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(input_ids.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(select, picked), outputs


def _chunk_logprobs_at(head: Callable, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), dim=-1)[:, token_ids]


def logprobs_at(
    model: Any, outputs: Any, token_ids: Sequence[int], chunk_mib: float = LOGPROB_CHUNK_MIB
) -> torch.Tensor:
    """[batch, seq, K]: log p(token_ids[k] at t | x_<t) at every position t, aligned as `token_logprobs`
    (column 0 is 0), from the final hidden states of `outputs` (of `target_logprobs(...,
    output_hidden_states=True)`). The output layer (checked as in `checked_head`) scores about `chunk_mib`
    MiB of fp32 logits at a time (all at once for `chunk_mib` <= 0); under autograd each chunk is recomputed
    in the backward pass."""
    hidden = outputs.hidden_states[-1]
    head = checked_head(model, hidden, outputs)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=hidden.device)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    step = chunk_rows(outputs.logits.shape[-1], chunk_mib) if chunk_mib > 0 else max(rows.shape[0], 1)
    checkpointed = torch.is_grad_enabled() and rows.requires_grad
    pieces = []
    for start in range(0, rows.shape[0], step):
        h = rows[start : start + step]
        if checkpointed:
            pieces.append(
                torch.utils.checkpoint.checkpoint(_chunk_logprobs_at, head, h, ids, use_reentrant=False)
            )
        else:
            pieces.append(_chunk_logprobs_at(head, h, ids))
    picked = torch.cat(pieces) if pieces else rows.new_zeros((0, ids.numel()), dtype=torch.float32)
    picked = picked.view(hidden.shape[0], hidden.shape[1] - 1, ids.numel())
    return torch.cat([picked.new_zeros(hidden.shape[0], 1, ids.numel()), picked], dim=1)
