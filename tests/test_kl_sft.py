"""The kl_sft loss (SFT plus kl_coef/2 * squared per-token log-ratio): hand-computed values and gradients,
its limits (plain SFT at kl_coef 0 and at policy == reference), its config errors, and a short run on the
tiny model that caches the reference and logs the penalty."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_config
from test_training import tiny_config, write_chats

from deepalign import cli
from deepalign.errors import ConfigError
from deepalign.losses import sft_loss
from deepalign.losses.kl_sft import kl_sft, kl_sft_loss
from deepalign.plugins import LOSSES

# A hand-written batch: column 0 is context, row 1 has a padded last column (whose -inf must not leak).
POLICY = [[0.0, -0.5, -1.2, -0.3], [-0.1, -2.0, -0.7, -float("inf")]]
REFERENCE = [[0.0, -0.9, -0.4, -0.3], [-0.2, -1.0, -1.5, -3.0]]
MASK = [[False, True, True, True], [False, True, True, False]]


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    return policy, torch.tensor(REFERENCE, dtype=torch.float64), torch.tensor(MASK)


def _masked() -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(MASK)) for j in range(len(MASK[0])) if MASK[i][j]]


def test_registered_with_reference():
    spec = LOSSES.get("kl_sft", "loss.name")
    assert spec.needs_reference and spec.fn is kl_sft


@pytest.mark.parametrize("kl_coef", [0.0, 0.7, 3.0])
def test_value_and_gradient_hand_computed(kl_coef):
    """loss = sum_t [-p_t + c/2 (p_t - r_t)^2] / n; d loss / d p_t = (-1 + c (p_t - r_t)) / n on targets,
    0 elsewhere."""
    policy, reference, mask = _batch()
    n = 7.0  # the optimizer step's target tokens (more than this micro-batch's 5)
    loss, penalty = kl_sft_loss(policy, reference, mask, n, kl_coef)
    cells = _masked()
    expected = sum(-POLICY[i][j] + kl_coef / 2 * (POLICY[i][j] - REFERENCE[i][j]) ** 2 for i, j in cells) / n
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-12)
    loss.backward()
    grad = torch.zeros(2, 4, dtype=torch.float64)
    for i, j in cells:
        grad[i, j] = (-1 + kl_coef * (POLICY[i][j] - REFERENCE[i][j])) / n
    torch.testing.assert_close(policy.grad, grad, atol=1e-12, rtol=0)
    # e.g. the token (0, 2): p = -1.2, r = -0.4, so d = -0.8 and the gradient is (-1 - 0.8 c) / 7
    assert float(policy.grad[0, 2]) == pytest.approx((-1 - 0.8 * kl_coef) / 7, abs=1e-12)
    assert float(penalty[0, 2]) == pytest.approx(kl_coef / 2 * 0.64, abs=1e-12)
    assert float(penalty[1, 3]) == 0.0 and float(penalty[0, 0]) == 0.0


def test_zero_coefficient_is_sft():
    policy, reference, mask = _batch()
    loss, _ = kl_sft_loss(policy, reference, mask, 5, 0.0)
    (grad,) = torch.autograd.grad(loss, policy)
    sft_policy = policy.detach().clone().requires_grad_(True)
    expected = sft_loss(sft_policy, mask, 5)
    (expected_grad,) = torch.autograd.grad(expected, sft_policy)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-12)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)


def test_policy_equal_to_reference_is_sft_for_any_coefficient():
    """At the aligned model itself (step 0 of training) the penalty and its gradient vanish."""
    policy, _, mask = _batch()
    reference = policy.detach().clone()
    reference[1, 3] = -3.0  # padding may differ: it is off the mask
    for kl_coef in (0.5, 10.0):
        loss, logs = kl_sft(policy, reference, mask, 5, {"kl_coef": kl_coef})
        (grad,) = torch.autograd.grad(loss, policy)
        sft_policy = policy.detach().clone().requires_grad_(True)
        expected = sft_loss(sft_policy, mask, 5)
        (expected_grad,) = torch.autograd.grad(expected, sft_policy)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-12)
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)
        assert logs == {"kl_penalty": 0.0}


def test_logged_penalty_is_the_mean_per_target_token():
    policy, reference, mask = _batch()
    _, logs = kl_sft(policy, reference, mask, 100, {"kl_coef": 2.0, "beta": None})
    squares = [(POLICY[i][j] - REFERENCE[i][j]) ** 2 for i, j in _masked()]
    assert logs["kl_penalty"] == pytest.approx(sum(squares) / len(squares), abs=1e-12)  # 2/2 * mean d^2


def test_half_precision_is_computed_in_float32():
    policy = torch.tensor(POLICY, dtype=torch.bfloat16)
    loss, _ = kl_sft_loss(policy, torch.tensor(REFERENCE), torch.tensor(MASK), 5, 1.0)
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))


def test_empty_batch_gives_zero_not_nan():
    policy, reference, _ = _batch()
    loss, logs = kl_sft(policy, reference, torch.zeros(2, 4, dtype=torch.bool), 0, {"kl_coef": 1.0})
    assert float(loss.detach()) == 0.0 and logs == {"kl_penalty": 0.0}


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "loss.params.kl_coef: loss kl_sft needs it"),
        ({"kl_coef": -0.1}, "loss.params.kl_coef: must be a finite number >= 0"),
        ({"kl_coef": float("nan")}, "loss.params.kl_coef: must be a finite number >= 0"),
        ({"kl_coef": "big"}, "loss.params.kl_coef: must be a number >= 0"),
    ],
)
def test_bad_coefficient_names_the_key(params, message):
    policy, reference, mask = _batch()
    with pytest.raises(ConfigError, match=message):
        kl_sft(policy, reference, mask, 5, params)


def test_yaml_holds_the_default():
    cfg = compose_config(["model=tiny", "logger=none", "loss=kl_sft"])
    assert cfg.loss.name == "kl_sft" and cfg.loss.params.kl_coef == 1.0


def _run(chat_file, run_dir, cache, *overrides: str) -> dict[str, float]:
    cfg = tiny_config(chat_file, "loss=kl_sft", f"paths.cache_dir={cache}", *overrides)
    return cli.run(cfg, run_dir)


def test_tiny_run_caches_the_reference_and_logs_the_penalty(tmp_path):
    chats = write_chats(tmp_path / "chats.jsonl")
    cache = tmp_path / "cache"
    metrics = _run(chats, tmp_path / "a", cache, "train.max_steps=3")
    assert metrics["train/reference_cache_hit"] == 0 and metrics["train/steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    penalties = [row["train/kl_penalty"] for row in log if "train/kl_penalty" in row]
    assert len(penalties) == 3
    # step 1 trains the aligned model itself: no penalty, and the loss is the plain NLL
    assert penalties[0] == pytest.approx(0.0, abs=1e-9)
    assert metrics["train/first_loss"] == pytest.approx(metrics["train/first_nll"], abs=2e-6)
    assert penalties[1] > 1e-6 and penalties[2] > 1e-6  # the policy has moved away from the reference
    # another run on the same model and data reads the cached reference log-probs
    again = _run(chats, tmp_path / "b", cache, "train.max_steps=1", "loss.params.kl_coef=5.0")
    assert again["train/reference_cache_hit"] == 1
    assert again["train/first_loss"] == pytest.approx(metrics["train/first_loss"], abs=2e-6)
