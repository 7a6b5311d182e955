"""bench/gpu_check.py's code path on a CPU (--dry-run: tiny model, plain AdamW): the table and the JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
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
        "generation tokens/s, dynamic KV cache",
        "generation tokens/s, static KV cache",
        "train loss first -> last",
    ):
        assert key in rows, key
    assert "plain torch AdamW (dry run: no DeepSpeed)" in rows["training"]
    assert "token-wise constrained loss" in rows["training"]
    assert "log-probs: chunked, 256 MiB" in rows["training"]
    assert float(rows["train tokens/s"].replace(",", "")) > 0
    assert rows["MFU"].startswith("n/a")  # no peak for a CPU unless --peak-tflops
    assert "same tokens as the first: yes" in rows["generation tokens/s, static KV cache"]
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["shape"]["hidden"] == 64 and results["shape"]["layers"] == 2
    for cache in ("dynamic", "static"):  # batch 4, every sequence the full 8 new tokens
        assert results["generation"][cache]["new_tokens"] == 4 * 8
    assert results["first_loss"] > 0 and results["last_loss"] > 0


def test_the_full_logits_path_trains_to_the_same_losses_as_the_chunked_one():
    gpu_check = _gpu_check()
    losses, threads = [], torch.get_num_threads()
    for chunk in ("0", "0.01"):  # 0.01 MiB: 5 tokens per chunk at the dry run's vocabulary of 512
        args = gpu_check.parse_args(["--dry-run", "--logprob-chunk-mib", chunk, "--gen-caches", "dynamic"])
        r = gpu_check.run(args)
        losses.append((r["first_loss"], r["last_loss"]))
        assert r["logprobs"] == ("full logits" if chunk == "0" else "chunked, 0.01 MiB")
    torch.set_num_threads(threads)  # the dry run sets one thread
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_presets_set_the_shape_and_flags_still_win():
    gpu_check = _gpu_check()
    big = gpu_check.shape_from(gpu_check.parse_args(["--preset", "7b"]))
    assert (big.hidden, big.layers, big.intermediate, big.checkpointing) == (4096, 32, 11008, True)
    assert gpu_check.shape_from(gpu_check.parse_args([])).hidden == 2048  # 1b by default
    assert gpu_check.shape_from(gpu_check.parse_args(["--preset", "7b", "--layers", "4"])).layers == 4
    dry = gpu_check.shape_from(gpu_check.parse_args(["--preset", "7b", "--dry-run"]))
    assert (dry.hidden, dry.checkpointing) == (64, True)  # the 7b path's checkpointing, at toy size


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
    assert "offload_optimizer" not in config["zero_optimization"]
    offload = _gpu_check().zero2_config(batch_size=8, hidden=2048, offload_optimizer=True)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_force_ds_cpu_optimizer"] is False


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
