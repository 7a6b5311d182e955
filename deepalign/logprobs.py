"""Padding and per-token log-probabilities of target tokens (teacher forcing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
