"""Padding and per-token log-probabilities of target tokens (teacher forcing)."""

from __future__ import annotations

from collections.abc import Sequence

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


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t), aligned to the token (output[:, t] scores input_ids[:, t]); column 0 is 0.

    Through cross_entropy, so no second [batch, seq, vocab] tensor of log-probs is kept.
    """
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    picked = -F.cross_entropy(shifted.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)
