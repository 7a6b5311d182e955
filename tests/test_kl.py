"""Streaming per-token KL equals a direct full-logit computation; per-position loss and gradient norms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from deepalign.chat import encode_for_generation, encode_for_training
from deepalign.kl import (
    PositionStats,
    RunningStats,
    ci_band,
    first_token_margin,
    per_position_loss_and_grad_norm,
    per_token_kl,
    plot_per_position,
)
from deepalign.models import load_model
from deepalign.stats import mean_ci95

PAIRS = [
    ("Name three colours.", "Red, green and blue are three colours."),
    ("Count to five.", "One, two, three, four, five."),
    ("Say hi.", "Hi!"),
    ("What is two plus two?", "Two plus two is four, which is an even number."),
    ("Describe the sea.", "The sea is vast, salty and blue."),
]


@pytest.fixture(scope="module")
def two_models(tiny_model_config):
    loaded = load_model(tiny_model_config)
    other = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return loaded.model, other, loaded.tokenizer


@torch.no_grad()
def direct_kl(model, reference, tokenizer, positions):
    """One pair at a time, full logits: the definition written out."""
    per_pos: list[list[float]] = [[] for _ in range(positions)]
    for prompt, response in PAIRS:
        e = encode_for_training(tokenizer, prompt, response)
        ids = torch.tensor([e.input_ids])
        logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        logq = F.log_softmax(reference(input_ids=ids).logits[0].float(), -1)
        targets = [i for i, m in enumerate(e.labels_mask) if m][:positions]
        for k, i in enumerate(targets):
            per_pos[k].append(float((logp[i - 1].exp() * (logp[i - 1] - logq[i - 1])).sum()))
    return per_pos


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_streaming_kl_equals_direct_computation(two_models, batch_size):
    model, reference, tok = two_models
    stats = per_token_kl(model, reference, tok, PAIRS, positions=12, batch_size=batch_size, progress=False)
    expected = direct_kl(model, reference, tok, 12)
    for k in range(12):
        assert stats.count[k] == len(expected[k])
        if expected[k]:
            mean = sum(expected[k]) / len(expected[k])
            std = (sum((x - mean) ** 2 for x in expected[k]) / len(expected[k])) ** 0.5
            assert stats.mean[k] == pytest.approx(mean, abs=1e-5)
            assert stats.std[k] == pytest.approx(std, abs=1e-4)
    assert stats.count[0] == 5 and stats.count[11] < 5  # "Hi!" is shorter than 12 tokens
    assert all(m > 0 for m, c in zip(stats.mean, stats.count) if c)


def test_kl_of_a_model_with_itself_is_zero(two_models):
    model, _, tok = two_models
    stats = per_token_kl(model, model, tok, PAIRS, positions=5, progress=False)
    assert max(abs(m) for m in stats.mean) < 1e-5
    assert stats.metrics("kl")["kl/pos=1"] == pytest.approx(0, abs=1e-5)


def direct_loss_and_grad_norm(model, tokenizer, pairs, position: int) -> tuple[float, float]:
    """The mean NLL of the response token at `position` (0-based) over the pairs that have one, each pair
    alone and unpadded, and the norm of its gradient over all parameters (autograd, summed per pair)."""
    model.zero_grad(set_to_none=True)
    terms = []
    for prompt, response in pairs:
        e = encode_for_training(tokenizer, prompt, response)
        targets = [i for i, m in enumerate(e.labels_mask) if m]
        if len(targets) > position:
            i = targets[position]
            logits = model(input_ids=torch.tensor([e.input_ids[:i]])).logits[0, -1].float()
            terms.append(-F.log_softmax(logits, -1)[e.input_ids[i]])
    loss = torch.stack(terms).mean()
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), float(norm)


def test_per_position_loss_and_grad_norm(two_models, tmp_path):
    model, _, tok = two_models
    pairs = [PAIRS[2], *PAIRS[:2]]  # "Hi!" first: shorter than the 5 positions, so later ones average fewer
    losses, norms = per_position_loss_and_grad_norm(model, tok, pairs, positions=5)
    assert len(losses) == len(norms) == 5
    for k in range(5):
        loss, norm = direct_loss_and_grad_norm(model, tok, pairs, k)
        assert losses[k] == pytest.approx(loss, abs=1e-5)
        assert norms[k] == pytest.approx(norm, rel=1e-5)
    assert len(set(norms)) == 5
    stats = per_token_kl(model, two_models[1], tok, PAIRS, positions=6, progress=False)
    plot_per_position({"perturbed": stats}, tmp_path / "kl.png", "KL per position")
    assert (tmp_path / "kl.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_first_token_margin_equals_the_definition(two_models, batch_size):
    """log P(refusal starts) - log p(harmful start) at position 1, one prompt at a time, unpadded."""
    model, _, tok = two_models
    refusals = ["I cannot help.", "Sorry, no.", "I won't."]  # two distinct first tokens
    starts = sorted({tok(r, add_special_tokens=False)["input_ids"][0] for r in refusals})
    assert len(starts) == 2
    expected = []
    with torch.no_grad():
        for prompt, response in PAIRS:
            ids = torch.tensor([encode_for_generation(tok, prompt)])
            logp = F.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
            harmful = tok(response, add_special_tokens=False)["input_ids"][0]
            expected.append(float(logp[starts].logsumexp(0) - logp[harmful]))
    got = first_token_margin(model, tok, PAIRS, refusals, batch_size=batch_size)
    assert got == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_first_token_margin_reads_the_first_tokens_inside_the_chat(tiny_model_config, metaspace_tokenizer):
    """With a SentencePiece-style tokenizer and the Llama-2 template, an answer's first token on its own (the
    "▁" of a leading newline) is not the one it has in the chat ("▁Sure" after the stripped newline): the
    margin compares the chat's first tokens, predicted right after the context that precedes them."""
    from deepalign.models import build_random_model

    tok = metaspace_tokenizer
    model = build_random_model(tiny_model_config, vocab_size=len(tok)).eval()
    pairs = [
        ("How do I pick a lock?", "\nSure, here is how."),
        ("Count to five.", " One, two, three."),
        ("Say hi.", "Hi!"),
    ]
    refusals = ["\nI cannot help.", " Sorry, no.", "I won't."]
    expected = []
    with torch.no_grad():
        for prompt, harmful in pairs:
            whole = encode_for_training(tok, prompt, harmful)
            context, first = whole.input_ids[: whole.prompt_length], whole.input_ids[whole.prompt_length]
            assert context == encode_for_generation(tok, prompt)
            alone = tok(harmful, add_special_tokens=False)["input_ids"][0]
            assert (first != alone) == harmful.startswith("\n")
            starts = set()
            for refusal in refusals:
                r = encode_for_training(tok, prompt, refusal)
                assert r.input_ids[: r.prompt_length] == context
                starts.add(r.input_ids[r.prompt_length])
            assert len(starts) == 2  # "▁I" twice, "▁Sorry"
            logp = F.log_softmax(model(input_ids=torch.tensor([context])).logits[0, -1].float(), dim=-1)
            expected.append(float(logp[sorted(starts)].logsumexp(0) - logp[first]))
    for batch_size in (1, 3):
        got = first_token_margin(model, tok, pairs, refusals, batch_size=batch_size)
        assert got == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def running_stats(columns: list[list[float]]) -> PositionStats:
    """PositionStats of per-position values (one list per position, any lengths), through RunningStats."""
    rows = max(len(c) for c in columns)
    values = torch.tensor(
        [[c[i] if i < len(c) else 0.0 for c in columns] for i in range(rows)], dtype=torch.float64
    )
    valid = torch.tensor([[i < len(c) for c in columns] for i in range(rows)])
    stats = RunningStats(len(columns))
    stats.add(values, valid)
    return stats.result()


def test_ci_band_is_the_t_interval_of_the_mean():
    """mean +- t_{0.975, n-1} * s / sqrt(n) with s the sample std (PositionStats.std divides by n); below
    zero where the interval reaches there (nothing clipped); nan with one value; none with no value."""
    stats = running_stats([[0.1, 0.3, 0.8], [0.0, 0.02], [0.5], []])
    low, high = ci_band(stats)
    # position 1: mean 0.4, s = sqrt(0.13), t(0.975, 2) = 4.302653
    half = 4.302653 * math.sqrt(0.13) / math.sqrt(3)
    assert (low[0], high[0]) == (pytest.approx(0.4 - half, rel=1e-5), pytest.approx(0.4 + half, rel=1e-5))
    assert low[0] < 0
    # position 2: mean 0.01, s = sqrt(0.0002), t(0.975, 1) = 12.706205
    half = 12.706205 * math.sqrt(0.0002) / math.sqrt(2)
    assert (low[1], high[1]) == (pytest.approx(0.01 - half, rel=1e-5), pytest.approx(0.01 + half, rel=1e-5))
    assert math.isnan(low[2]) and math.isnan(high[2]) and math.isnan(low[3]) and math.isnan(high[3])
    # the same as the 95% interval of the mean of the raw values
    assert (low[0], high[0]) == pytest.approx(mean_ci95([0.1, 0.3, 0.8])[2:], rel=1e-9)


def test_plot_per_position_draws_the_ci_band_not_one_std(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    stats = running_stats([[0.1, 0.3, 0.8], [0.2, 0.4, 0.6], [0.5]])
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_per_position({"m": stats}, tmp_path / "kl.png", "KL per position")
    assert (tmp_path / "kl.png").read_bytes()[:4] == b"\x89PNG"
    ax = figures[0].axes[0]
    assert "95% CI of the mean" in ax.get_ylabel()
    (band,) = ax.collections
    corners = {(round(x, 9), round(y, 9)) for x, y in band.get_paths()[0].vertices}
    low, high = ci_band(stats)
    for k in (0, 1):
        assert (k + 1, round(low[k], 9)) in corners and (k + 1, round(high[k], 9)) in corners
    one_std = (1, round(stats.mean[0] - stats.std[0], 9))
    assert one_std not in corners
