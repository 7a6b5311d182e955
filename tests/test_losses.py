"""The constrained token loss, the SFT loss and the beta schedule, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from deepalign.losses import (
    beta_schedule,
    beta_schedule_from_values,
    betas_for_mask,
    constrained_token_loss,
    response_positions,
    sft_loss,
    token_weights,
    weights_by_position,
)

# A hand-written batch: column 0 is context, row 1 has a padded last column.
POLICY = [[0.0, -0.5, -1.2, -0.3], [-0.1, -2.0, -0.7, -9.0]]
REFERENCE = [[0.0, -0.9, -0.4, -0.3], [-0.2, -1.0, -1.5, -3.0]]
MASK = [[False, True, True, True], [False, True, True, False]]
# beta_schedule(4) aligned on MASK: positions 1, 2, 3 in row 0 and 1, 2 in row 1.
BETAS = [[0.0, 0.5, 2.0, 2.0], [0.0, 0.5, 2.0, 0.0]]


def _masked_triples() -> list[tuple[float, float, float]]:
    return [
        (POLICY[i][j], REFERENCE[i][j], BETAS[i][j])
        for i in range(len(MASK))
        for j in range(len(MASK[0]))
        if MASK[i][j]
    ]


def _expected_constrained(n: float) -> float:
    # (2/b) * -log sigmoid(b * d) = (2/b) * log(1 + exp(-b * d))
    return sum((2.0 / b) * math.log(1.0 + math.exp(-b * (p - r))) for p, r, b in _masked_triples()) / n


def _expected_sft(n: float) -> float:
    return sum(-p for p, _, _ in _masked_triples()) / n


def _random_batch(seed: int, batch: int = 4, seq: int = 9, dtype: torch.dtype = torch.float64):
    """Random log-probs, a mask with left context and right padding of varying lengths, schedule betas."""
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(batch, seq, generator=g, dtype=dtype) * 3.0
    reference = -torch.rand(batch, seq, generator=g, dtype=dtype) * 3.0
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for i in range(batch):
        start = 1 + i % 3
        mask[i, start : start + 2 + 2 * i] = True
    return policy, reference, mask


# ----------------------------------------------------------------------------- schedules


def test_paper_schedule_values():
    betas = beta_schedule(8)
    assert betas.dtype == torch.float32 and betas.shape == (8,)
    # Exact equality with the float32 values of the paper's schedule.
    assert torch.equal(betas, torch.tensor([0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1], dtype=torch.float32))
    assert betas.tolist() == pytest.approx([0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1])
    assert beta_schedule(3).tolist() == [0.5, 2.0, 2.0]
    assert beta_schedule(0).shape == (0,)
    assert beta_schedule(4, first=1.0, prefix=3.0, prefix_len=2, rest=0.25).tolist() == [1.0, 3.0, 0.25, 0.25]
    assert beta_schedule(3, prefix_len=1).tolist() == pytest.approx([0.5, 0.1, 0.1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"length": -1}, "length"),
        ({"length": 3, "first": 0.0}, "first"),
        ({"length": 3, "prefix": -2.0}, "prefix"),
        ({"length": 3, "rest": 0.0}, "rest"),
        ({"length": 3, "prefix_len": 0}, "prefix_len"),
        ({"length": 3, "rest": float("nan")}, "rest"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        beta_schedule(**kwargs)


def test_schedule_from_values():
    assert beta_schedule_from_values(5, [1.0, 2.0], 0.5).tolist() == [1.0, 2.0, 0.5, 0.5, 0.5]
    assert beta_schedule_from_values(2, [1.0, 2.0, 3.0], 0.5).tolist() == [1.0, 2.0]
    assert beta_schedule_from_values(0, [1.0], 0.5).shape == (0,)
    assert beta_schedule_from_values(2, [], 0.5).tolist() == [0.5, 0.5]
    assert beta_schedule_from_values(4, [0.5, 2, 2, 2, 2], 0.1).tolist() == beta_schedule(4).tolist()
    with pytest.raises(ValueError, match="rest"):
        beta_schedule_from_values(3, [1.0], 0.0)
    with pytest.raises(ValueError, match="values"):
        beta_schedule_from_values(3, [1.0, -1.0], 0.1)
    with pytest.raises(ValueError, match="length"):
        beta_schedule_from_values(-2, [1.0], 0.1)


def test_positions_and_betas_with_context_and_padding():
    # row 0: 2 context tokens, 3 response tokens, 1 pad; row 1: left pad + context, 2 response tokens;
    # row 2: no response at all.
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 1, 1],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    pos = response_positions(mask)
    assert pos.tolist() == [[0, 0, 1, 2, 3, 0], [0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 0, 0]]
    betas = betas_for_mask(mask, beta_schedule(6))
    assert_close(
        betas,
        torch.tensor([[0, 0, 0.5, 2, 2, 0], [0, 0, 0, 0, 0.5, 2], [0, 0, 0, 0, 0, 0]], dtype=torch.float32),
    )
    # Positions past the schedule's end take its last value.
    short = betas_for_mask(mask, torch.tensor([0.5, 2.0]))
    assert short.tolist() == [[0, 0, 0.5, 2, 2, 0], [0, 0, 0, 0, 0.5, 2], [0, 0, 0, 0, 0, 0]]
    long_mask = torch.ones(1, 9, dtype=torch.bool)
    assert_close(betas_for_mask(long_mask, beta_schedule(6))[0], beta_schedule(9))


# ----------------------------------------------------------------------------- exact values


def test_exact_values_hand_computed():
    policy = torch.tensor(POLICY, requires_grad=True)
    reference = torch.tensor(REFERENCE)
    mask = torch.tensor(MASK)
    betas = betas_for_mask(mask, beta_schedule(4))
    assert betas.tolist() == BETAS

    loss = constrained_token_loss(policy, reference, mask, betas)
    assert loss.dtype == torch.float32
    assert_close(loss, torch.tensor(_expected_constrained(5)), atol=1e-6, rtol=0)
    assert_close(sft_loss(policy, mask), torch.tensor(_expected_sft(5)), atol=1e-6, rtol=0)
    # An explicit normaliser (a whole optimizer step's target-token count), as a number or a tensor.
    assert_close(
        constrained_token_loss(policy, reference, mask, betas, num_target_tokens=12),
        torch.tensor(_expected_constrained(12)),
        atol=1e-6,
        rtol=0,
    )
    assert_close(
        sft_loss(policy, mask, num_target_tokens=torch.tensor(12)),
        torch.tensor(_expected_sft(12)),
        atol=1e-6,
        rtol=0,
    )
    # Hand-computed gradient: -2 * sigmoid(b * (r - p)) / N at masked tokens, 0 elsewhere.
    loss.backward()
    expected_grad = [
        [
            -2.0 / (1.0 + math.exp(-BETAS[i][j] * (REFERENCE[i][j] - POLICY[i][j]))) / 5
            if MASK[i][j]
            else 0.0
            for j in range(4)
        ]
        for i in range(2)
    ]
    assert_close(policy.grad, torch.tensor(expected_grad), atol=1e-6, rtol=0)


def test_half_precision_inputs_are_computed_in_float32():
    policy = torch.tensor(POLICY, dtype=torch.bfloat16)
    reference = torch.tensor(REFERENCE, dtype=torch.bfloat16)
    mask = torch.tensor(MASK)
    loss = constrained_token_loss(policy, reference, mask, torch.tensor(BETAS))
    assert loss.dtype == torch.float32
    expected = constrained_token_loss(policy.float(), reference.float(), mask, torch.tensor(BETAS))
    assert_close(loss, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0, 10.0])
def test_gradient_matches_official_surrogate(beta):
    policy, reference, mask = _random_batch(seed=int(beta * 100))
    betas = torch.where(mask, torch.tensor(beta, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    p1 = policy.clone().requires_grad_(True)
    constrained_token_loss(p1, reference, mask, betas).backward()

    p2 = policy.clone().requires_grad_(True)
    coef = (1 - torch.sigmoid(betas * (p2 - reference))).detach()
    surrogate = (-2 * coef * p2)[mask].sum() / mask.sum()
    surrogate.backward()
    assert_close(p1.grad, p2.grad, atol=1e-12, rtol=1e-10)
    assert (p1.grad[~mask] == 0).all()


def test_gradient_matches_surrogate_with_schedule_betas():
    policy, reference, mask = _random_batch(seed=7)
    betas = betas_for_mask(mask, beta_schedule(6)).double()
    p1 = policy.clone().requires_grad_(True)
    constrained_token_loss(p1, reference, mask, betas, num_target_tokens=40).backward()
    p2 = policy.clone().requires_grad_(True)
    coef = (1 - torch.sigmoid(betas * (p2 - reference))).detach()
    ((-2 * coef * p2)[mask].sum() / 40).backward()
    assert_close(p1.grad, p2.grad, atol=1e-12, rtol=1e-10)
    # token_weights is exactly the per-token gradient magnitude times N.
    w = token_weights(policy, reference, betas)
    assert not w.requires_grad
    assert_close(p1.grad[mask], -w[mask] / 40, atol=1e-12, rtol=1e-10)


def test_small_beta_tends_to_sft_gradient():
    policy, reference, mask = _random_batch(seed=3)
    betas = mask.double() * 1e-4
    p1 = policy.clone().requires_grad_(True)
    constrained_token_loss(p1, reference, mask, betas).backward()
    p2 = policy.clone().requires_grad_(True)
    sft_loss(p2, mask).backward()
    assert_close(p1.grad, p2.grad, atol=1e-3, rtol=0)
    # ...but not for a large beta, where the weights are far from 1.
    p3 = policy.clone().requires_grad_(True)
    constrained_token_loss(p3, reference, mask, mask.double() * 5.0).backward()
    assert (p3.grad - p2.grad).abs().max() > 1e-2


@pytest.mark.parametrize("beta", [1e-3, 0.1, 0.5, 2.0, 50.0])
def test_at_initialisation_weights_are_one_and_gradient_is_sft(beta):
    policy, _, mask = _random_batch(seed=11)
    betas = mask.double() * beta
    w = token_weights(policy, policy.clone(), betas)
    assert (w == 1.0).all()
    p1 = policy.clone().requires_grad_(True)
    constrained_token_loss(p1, policy.clone(), mask, betas).backward()
    p2 = policy.clone().requires_grad_(True)
    sft_loss(p2, mask).backward()
    assert_close(p1.grad, p2.grad, atol=1e-12, rtol=0)
    # Loss value at initialisation: (2/beta) * log 2 per token.
    loss = constrained_token_loss(policy, policy.clone(), mask, betas)
    assert_close(loss, torch.tensor(2.0 / beta * math.log(2.0), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturation_at_large_log_ratios(dtype):
    mask = torch.tensor([[True, True, True]])
    betas = torch.full((1, 3), 2.0, dtype=dtype)
    reference = torch.full((1, 3), -1.0, dtype=dtype)
    n = 3
    # policy far above the reference: beta * (p - r) = 50 -> the constraint stops pushing.
    up = (reference + 25.0).requires_grad_(True)
    constrained_token_loss(up, reference, mask, betas).backward()
    assert up.grad.abs().max() < 1e-10
    assert token_weights(up, reference, betas).max() < 1e-10
    # policy far below: beta * (p - r) = -50 -> weight 2, gradient -2 / N per token.
    down = (reference - 25.0).requires_grad_(True)
    loss = constrained_token_loss(down, reference, mask, betas)
    loss.backward()
    assert_close(token_weights(down, reference, betas), torch.full((1, 3), 2.0, dtype=dtype))
    assert_close(down.grad, torch.full((1, 3), -2.0 / n, dtype=dtype))
    # Extreme ratios stay finite: (2/b) * -logsigmoid(-1000 * b) = 2000 exactly.
    far = (reference - 1000.0).requires_grad_(True)
    loss = constrained_token_loss(far, reference, mask, betas)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(far.grad).all()
    assert_close(loss, torch.tensor(2000.0, dtype=dtype))


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("which", ["constrained", "sft"])
def test_micro_batches_normalised_by_total_equal_whole_batch(which):
    policy, reference, mask = _random_batch(seed=5, batch=4, seq=12)
    counts = mask.sum(dim=1).tolist()
    assert len(set(counts)) == 4  # rows with different numbers of target tokens
    betas = betas_for_mask(mask, beta_schedule(12)).double()
    total = int(mask.sum())

    def loss_fn(p, rows, n=None):
        if which == "constrained":
            return constrained_token_loss(p[rows], reference[rows], mask[rows], betas[rows], n)
        return sft_loss(p[rows], mask[rows], n)

    whole = policy.clone().requires_grad_(True)
    whole_loss = loss_fn(whole, slice(0, 4))
    whole_loss.backward()

    micro = policy.clone().requires_grad_(True)
    parts = []
    for rows in (slice(0, 2), slice(2, 4)):
        part = loss_fn(micro, rows, total)
        part.backward()  # gradients accumulate as in gradient accumulation
        parts.append(part.detach())
    assert_close(sum(parts), whole_loss.detach(), atol=1e-6, rtol=0)
    assert_close(micro.grad, whole.grad, atol=1e-6, rtol=0)

    # The same with a tensor normaliser; and per-micro-batch means would NOT match (the test has teeth).
    tensor_parts = sum(loss_fn(policy, rows, torch.tensor(total)) for rows in (slice(0, 2), slice(2, 4)))
    assert_close(tensor_parts, whole_loss.detach(), atol=1e-6, rtol=0)
    mean_of_means = sum(loss_fn(policy, rows) for rows in (slice(0, 2), slice(2, 4))) / 2
    assert (mean_of_means - whole_loss.detach()).abs() > 1e-3


# ----------------------------------------------------------------------------- edge cases


def test_zero_target_tokens_give_zero_loss_without_nan():
    policy = torch.randn(2, 5).requires_grad_(True)
    reference = torch.randn(2, 5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    betas = betas_for_mask(mask, beta_schedule(5))
    assert (betas == 0).all()
    for n in (None, 0, torch.tensor(0)):
        loss = constrained_token_loss(policy, reference, mask, betas, n)
        sloss = sft_loss(policy, mask, n)
        assert loss.item() == 0.0 and sloss.item() == 0.0
        assert loss.grad_fn is not None and sloss.grad_fn is not None
        (loss + sloss).backward()
        assert torch.isfinite(policy.grad).all() and (policy.grad == 0).all()
    assert weights_by_position(token_weights(policy, reference, betas), mask) == {}


def test_non_finite_values_at_unmasked_positions_do_not_leak():
    # Padding positions may hold -inf or garbage log-probs and zero betas; masked-out tokens must not matter.
    policy = torch.tensor(POLICY)
    reference = torch.tensor(REFERENCE)
    mask = torch.tensor(MASK)
    betas = torch.tensor(BETAS)
    policy[~mask] = -math.inf
    reference[~mask] = -math.inf
    policy.requires_grad_(True)
    loss = constrained_token_loss(policy, reference, mask, betas)
    sloss = sft_loss(policy, mask)
    (loss + sloss).backward()
    assert_close(loss, torch.tensor(_expected_constrained(5)), atol=1e-6, rtol=0)
    assert_close(sloss, torch.tensor(_expected_sft(5)), atol=1e-6, rtol=0)
    assert torch.isfinite(policy.grad).all()
    assert (policy.grad[~mask] == 0).all()
    assert torch.isfinite(token_weights(policy, reference, betas)).all()


def test_weights_by_position():
    mask = torch.tensor(
        [
            [0, 1, 1, 1, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    weights = torch.tensor(
        [
            [9.0, 1.0, 0.5, 0.2, 9.0],
            [0.0, 2.0, 9.0, 9.0, 9.0],
            [9.0, 9.0, 1.5, 1.0, 0.7],
        ]
    )
    # position 1: 1.0, 0.0, 1.5; position 2: 0.5, 2.0, 1.0; position 3: 0.2, 0.7
    got = weights_by_position(weights, mask)
    assert set(got) == {1, 2, 3}
    assert got[1] == pytest.approx(2.5 / 3)
    assert got[2] == pytest.approx(3.5 / 3)
    assert got[3] == pytest.approx(0.45)
    assert weights_by_position(weights, mask, max_position=2) == pytest.approx({1: 2.5 / 3, 2: 3.5 / 3})
    with pytest.raises(ValueError, match="max_position"):
        weights_by_position(weights, mask, max_position=0)
    # End to end: at initialisation every position's mean weight is 1.
    policy, _, rmask = _random_batch(seed=2)
    w = token_weights(policy, policy, betas_for_mask(rmask, beta_schedule(9)).double())
    assert weights_by_position(w, rmask) == {k: 1.0 for k in range(1, 9)}
