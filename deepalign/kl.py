"""Per-token KL(model || reference) along a response, teacher-forced, computed streaming in batches.

For each (prompt, response) pair and response position k = 1..N:
KL( pi(. | x, y_<k) || pi_ref(. | x, y_<k) ), averaged over pairs (paper Fig. 1). Only one batch of logits
is alive at a time, and only at the response positions scored (memory bounded by batch x positions x
vocabulary, independent of the data set size and the sequence length); nothing is written but the
per-position statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from deepalign.chat import encode_for_training, response_tokens
from deepalign.logprobs import checked_head, final_hidden_states, pad_batch, pad_sequences
from deepalign.stats import t_quantile


@dataclass
class PositionStats:
    """Mean, std and count per response position (index 0 is position 1)."""

    mean: list[float]
    std: list[float]
    count: list[int]

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/pos={k + 1}": round(m, 6) for k, m in enumerate(self.mean) if self.count[k]}


class RunningStats:
    """Sums of x and x^2 per position in float64 (Welford is not needed at these magnitudes)."""

    def __init__(self, positions: int):
        self.s = torch.zeros(positions, dtype=torch.float64)
        self.ss = torch.zeros(positions, dtype=torch.float64)
        self.n = torch.zeros(positions, dtype=torch.float64)

    def add(self, values: torch.Tensor, valid: torch.Tensor) -> None:
        """values, valid: [batch, positions]."""
        v = torch.where(valid, values.double(), 0.0)
        self.s += v.sum(0)
        self.ss += (v * v).sum(0)
        self.n += valid.double().sum(0)

    def result(self) -> PositionStats:
        n = self.n.clamp(min=1)
        mean = self.s / n
        var = (self.ss / n - mean * mean).clamp(min=0)
        return PositionStats(mean.tolist(), var.sqrt().tolist(), [int(c) for c in self.n.tolist()])


def response_index(labels_mask: Sequence[bool], positions: int) -> list[int]:
    """Indices of the first `positions` response tokens (fewer if the response is shorter)."""
    return [i for i, m in enumerate(labels_mask) if m][:positions]


def _gather_logits(model, ids, attention, index: torch.Tensor) -> torch.Tensor:
    """Log-probs predicting the tokens at `index` [batch, positions]: the output layer on the hidden states at
    index - 1 only (no logits for the rest of the sequence), log_softmax in float32."""
    hidden, outputs = final_hidden_states(model, input_ids=ids, attention_mask=attention)
    picked = hidden.gather(1, (index - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return F.log_softmax(checked_head(model, hidden, outputs)(picked).float(), dim=-1)


@torch.no_grad()
def per_token_kl(
    model,
    reference,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    positions: int = 20,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = True,
) -> PositionStats:
    """KL(model || reference) at response positions 1..positions, mean and std over the pairs."""
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device
    stats = RunningStats(positions)
    encoded = [encode_for_training(tokenizer, p, r, system=system) for p, r in pairs]
    for start in tqdm(
        range(0, len(encoded), batch_size), desc="per-token KL", unit="batch", disable=not progress
    ):
        batch = encoded[start : start + batch_size]
        padded = pad_batch([e.input_ids for e in batch], tokenizer.pad_token_id)
        ids, attention = padded.input_ids, padded.attention_mask
        # Each row's response-token positions, padded with 1 (any valid index); `valid` marks the real ones.
        rows = [response_index(e.labels_mask, positions) for e in batch]
        valid = pad_sequences([[1] * len(r) for r in rows], 0).bool()
        index = pad_sequences(rows, 1)
        width = index.shape[1]
        logp = _gather_logits(model, ids.to(device), attention.to(device), index.to(device))
        logq = _gather_logits(reference, ids.to(ref_device), attention.to(ref_device), index.to(ref_device))
        kl = (logp.exp() * (logp - logq.to(logp.device))).sum(-1).cpu()  # [batch, width]
        del logp, logq  # not alive during the next batch's forward passes
        padded = torch.zeros(len(batch), positions)
        padded[:, :width] = kl
        mask = torch.zeros(len(batch), positions, dtype=torch.bool)
        mask[:, :width] = valid
        stats.add(padded, mask)
    return stats.result()


@torch.no_grad()
def first_token_margin(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    refusals: Sequence[str],
    system: str | None = None,
    batch_size: int = 16,
) -> float:
    """Mean over (prompt, harmful response) pairs of log P(a refusal's first token) - log p(the harmful
    response's first token), at response position 1: how strongly the model prefers to start refusing. The
    refusal side sums the probabilities of the distinct first tokens of `refusals`. The constrained loss
    stops pushing a token once its log-prob has risen a few / beta nats above the aligned model's, so this
    margin tells how much a given first-position beta can protect.

    Every first token is the response's first token inside the rendered chat (`chat.response_tokens`), and
    the logits are those at the end of the context that precedes it there."""
    contexts, comply, refuse_ids = [], [], []
    for prompt, harmful in pairs:
        tokens = response_tokens(tokenizer, prompt, harmful, system=system)
        context = tokens.context_ids(0)
        starts = set()
        for refusal in refusals:
            r = response_tokens(tokenizer, prompt, refusal, system=system)
            if r.context_ids(0) != context:
                raise ValueError(
                    f"the chat template renders the refusal {refusal[:40]!r} after other context tokens than "
                    f"the response {harmful[:40]!r}: their first tokens are not at the same position"
                )
            starts.add(r.input_ids[r.start])
        contexts.append(context)
        comply.append(tokens.input_ids[tokens.start])
        refuse_ids.append(sorted(starts))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    margins = []
    for start in range(0, len(pairs), batch_size):
        batch = contexts[start : start + batch_size]
        padded = pad_batch(batch, pad, side="left", device=device)
        ids, attention = padded.input_ids, padded.attention_mask
        logp = F.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, -1].float(), dim=-1)
        for row in range(len(batch)):
            refuse = logp[row, refuse_ids[start + row]].logsumexp(-1)
            margins.append(float(refuse - logp[row, comply[start + row]]))
    return sum(margins) / len(margins)


def per_position_loss_and_grad_norm(
    model, tokenizer, pairs: Sequence[tuple[str, str]], positions: int = 20, system: str | None = None
) -> tuple[list[float], list[float]]:
    """Mean NLL of the response token at each position and its gradient norm (one backward per position),
    on one batch of pairs: where a fine-tuning step would push hardest (paper Fig. 3)."""
    encoded = [encode_for_training(tokenizer, p, r, system=system) for p, r in pairs]
    device = next(model.parameters()).device
    padded = pad_batch([e.input_ids for e in encoded], tokenizer.pad_token_id, device=device)
    ids, attention = padded.input_ids, padded.attention_mask
    rows = [response_index(e.labels_mask, positions) for e in encoded]
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=ids, attention_mask=attention).logits
    logp = F.log_softmax(logits.float(), dim=-1)
    losses, norms = [], []
    for k in range(positions):
        picks = [(b, r[k]) for b, r in enumerate(rows) if len(r) > k]
        if not picks:
            break
        nll = torch.stack([-logp[b, i - 1, ids[b, i]] for b, i in picks]).mean()
        grads = torch.autograd.grad(nll, params, retain_graph=True, allow_unused=True)
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
        losses.append(float(nll.detach()))
        norms.append(float(norm))
    return losses, norms


def ci_band(stats: PositionStats) -> tuple[list[float], list[float]]:
    """The 95% confidence interval of the mean at each position: mean +- t_{0.975, n-1} * s / sqrt(n), with
    s the sample std. `PositionStats.std` divides by n (RunningStats), so s = std * sqrt(n / (n - 1)).
    nan where a position has fewer than two values. Nothing is clipped: a lower bound below zero (a KL
    near zero) is what the interval says."""
    low, high = [], []
    for mean, std, n in zip(stats.mean, stats.std, stats.count):
        if n < 2:
            low.append(math.nan)
            high.append(math.nan)
            continue
        half = t_quantile(0.975, n - 1) * std * math.sqrt(n / (n - 1)) / math.sqrt(n)
        low.append(mean - half)
        high.append(mean + half)
    return low, high


def plot_per_position(
    curves: dict[str, PositionStats], path: str | Path, title: str, ylabel: str = "KL (nats)"
) -> None:
    """A PNG of the mean per response position, one curve per name, with its band: the 95% confidence
    interval of the mean over the pairs (`ci_band`), not +-1 std (the spread of single pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, stats in curves.items():
        xs = [k + 1 for k, c in enumerate(stats.count) if c]
        low, high = ci_band(stats)
        line = ax.plot(xs, [stats.mean[k - 1] for k in xs], marker="o", markersize=3, label=name)[0]
        ax.fill_between(
            xs, [low[k - 1] for k in xs], [high[k - 1] for k in xs], color=line.get_color(), alpha=0.15
        )
    ax.set_xlabel("response token position")
    ax.set_ylabel(f"{ylabel}, mean and 95% CI of the mean")
    save_figure(fig, ax, path, title)


def save_figure(fig, ax, path: str | Path, title: str) -> None:
    """Title, grid and legend on `ax`; `fig` written to `path` (folders made) as a 120-dpi PNG and closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
