"""Useful work per stage (deepalign/flops.py): tokens counted where the model sees them, 2 x params forward,
6 x params with a graph; the report's and the bench's efficiency table."""

from __future__ import annotations

import pytest
import torch
from conftest import run_quickstart_stages

from deepalign.flops import count_flops, gflop_so_far, machine_gflops
from deepalign.models import load_model
from deepalign.report import efficiency_table


@pytest.fixture(scope="module")
def tiny(tiny_model_config):
    return load_model(tiny_model_config)  # load_model counts its passes


def test_forward_passes_count_real_tokens_and_training_counts_three_times(tiny):
    params = sum(p.numel() for p in tiny.model.parameters())
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # left padding: 6 real tokens
    before = gflop_so_far()
    with torch.no_grad():
        tiny.model(input_ids=ids, attention_mask=mask)
    forward = gflop_so_far() - before
    assert forward == pytest.approx(2 * params * 6 / 1e9)
    before = gflop_so_far()
    tiny.model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert gflop_so_far() - before == pytest.approx(3 * forward)


def test_generation_counts_the_prompt_once_and_each_new_token(tiny):
    model = torch.nn.Linear(2, 2)  # a module that takes input_ids as its first argument counts rows x length
    count_flops(model)
    before = gflop_so_far()
    with torch.no_grad():
        model(torch.zeros(3, 5, 2))
    assert gflop_so_far() - before == pytest.approx(2 * 6 * 15 / 1e9)
    params = sum(p.numel() for p in tiny.model.parameters())
    ids = torch.tensor([[5, 6, 7]])
    before = gflop_so_far()
    out = tiny.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
    )
    steps = out.shape[1] - 3  # the prompt's pass, then one token per step (the last new one is not fed back)
    assert gflop_so_far() - before == pytest.approx(2 * params * (3 + steps - 1) / 1e9)


def test_the_machine_rate_is_the_probe_times_the_threads(tmp_path, monkeypatch):
    from deepalign import precision

    monkeypatch.setenv(precision.ENV_OVERRIDE, "0")  # fp32, no probe: no rate
    rate, dtype = machine_gflops(tmp_path)
    assert dtype == "fp32" and rate != rate
    monkeypatch.delenv(precision.ENV_OVERRIDE)
    monkeypatch.setattr(precision, "probe_cpu", lambda: {"fp32_ms": 4.0, "bf16_ms": 8.0})
    precision._DECIDED.clear()
    rate, dtype = machine_gflops(tmp_path)
    rows, n_in, n_out = precision.PROBE_SHAPE
    assert dtype == "fp32" and rate == pytest.approx(
        2 * rows * n_in * n_out / 4e-3 / 1e9 * torch.get_num_threads()
    )
    precision._DECIDED.clear()


def test_the_efficiency_table_adds_up_the_stages(tmp_path, monkeypatch, capsys):
    metrics = {
        "time/quickstart/harvest_s": 100.0,
        "flops/quickstart/harvest_gflop": 5000.0,
        "shallow/time/train_s": 50.0,
        "shallow/flops/train/gflop": 10000.0,
        "shallow/time/attack_s": 50.0,
        "shallow/flops/attack/gflop": 5000.0,
        "time/quickstart/margin_s": 0.0,
        "flops/quickstart/margin_gflop": 0.0,
        "machine/fp32_gflops": 200.0,
    }
    assert efficiency_table(metrics, ["shallow"]) == [
        "| part | stage | seconds | useful GFLOP | GFLOP/s | % of 200 GFLOP/s (fp32) |",
        "|---|---|---|---|---|---|",
        "| harvest | generate | 100 | 5000 | 50 | 25% |",
        "| shallow | train | 50 | 10000 | 200 | 100% |",
        "| shallow | attack | 50 | 5000 | 100 | 50% |",
        "| margins | first-token margin | 0 | 0 | 0 | - |",
        "| total |  | 200 | 20000 | 100 | 50% |",
    ]
    assert efficiency_table({"time/quickstart/harvest_s": 1.0}, ["shallow"]) == []
    metrics["time/quickstart/shallow_s"] = 100.0
    run_quickstart_stages(tmp_path, metrics, monkeypatch)
    assert "| total |  | 200 | 20000 | 100 | 50% |" in capsys.readouterr().out
