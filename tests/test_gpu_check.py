"""bench/gpu_check.py's code path on a CPU (--dry-run: tiny model, plain AdamW): the table and the JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import torch
from conftest import REPO


def test_gpu_check_dry_run_prints_the_table(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--dry-run",
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run on CPU" in out.stdout
    rows = dict(
        line.strip("|").split(" | ", 1)
        for line in out.stdout.splitlines()
        if line.startswith("| ") and " | " in line
    )
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    for key in (
        "train tokens/s",
        "MFU",
        "peak memory, training (GiB)",
        "generation tokens/s",
        "train loss first -> last",
    ):
        assert key in rows, key
    assert "plain torch AdamW (dry run: no DeepSpeed)" in rows["training"]
    assert "token-wise constrained loss" in rows["training"]
    assert float(rows["train tokens/s"].replace(",", "")) > 0
    assert rows["MFU"].startswith("n/a")  # no peak for a CPU unless --peak-tflops
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["shape"]["hidden"] == 64 and results["shape"]["layers"] == 2
    assert results["gen_new_tokens"] == 4 * 8  # batch 4, every sequence the full 8 new tokens
    assert results["first_loss"] > 0 and results["last_loss"] > 0


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_deepspeed_config_is_the_repos_zero2_with_every_auto_filled():
    config = _gpu_check().zero2_config(batch_size=8, hidden=2048)
    assert "auto" not in json.dumps(config)
    assert config["zero_optimization"]["stage"] == 2 and config["zero_allow_untested_optimizer"]
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] == 8


def test_peak_flops_by_gpu_name(monkeypatch):
    gpu_check = _gpu_check()
    cuda = torch.device("cuda", 0)
    for name, tflops in (
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA H100 80GB HBM3", 989),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert gpu_check.peak_flops(cuda, None)[0] == tflops * 1e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert gpu_check.peak_flops(cuda, None)[0] is None
    assert gpu_check.peak_flops(cuda, 500.0) == (500e12, "--peak-tflops")
