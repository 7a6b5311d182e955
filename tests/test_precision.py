"""deepalign/precision.py: the `auto` precision decision (CUDA, the CPU probe, its cache, the override), and
how train.bf16, generation.dtype and env.json use it. Probe results are faked: the suite's numbers must not
depend on the CPU it runs on."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from conftest import compose_config

from deepalign import precision
from deepalign.config import ConfigError, GenerationConfig, validate
from deepalign.generation import make_engine
from deepalign.models import load_model
from deepalign.precision import bf16_decision, generation_autocast, train_bf16
from deepalign.rundir import environment_record
from deepalign.training import training_arguments

NATIVE = {"fp32_ms": 10.2, "bf16_ms": 5.9}  # a CPU with native bf16 (AMX), as measured
AVX2 = {"fp32_ms": 10.0, "bf16_ms": 78.0}  # AVX2 only: bf16 emulated, 8x slower (AMD EPYC, one thread)


@pytest.fixture
def probe(monkeypatch):
    """The CPU probe faked: `probe.result` is what it measures, `probe.calls` how often it ran."""

    class Fake:
        def __init__(self) -> None:
            self.result, self.calls = NATIVE, 0

        def __call__(self) -> dict[str, float]:
            self.calls += 1
            return dict(self.result)

    fake = Fake()
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)  # conftest sets it for the rest of the suite
    monkeypatch.setattr(precision, "probe_cpu", fake)
    monkeypatch.setattr(precision, "_DECIDED", {})
    monkeypatch.setattr(precision, "_LOGGED", set())
    return fake


def test_a_cpu_with_native_bf16_gets_bf16_and_the_log_says_why(probe, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="deepalign.precision")
    decision = bf16_decision("cpu", tmp_path)
    assert decision.bf16 is True
    assert decision.probe == {"fp32_ms": 10.2, "bf16_ms": 5.9, "threads": 1, "cached": False}
    assert "bf16 1.73x the speed of fp32" in decision.reason
    assert "precision: bf16 autocast on (probe: fp32 10.2 ms, bf16 5.9 ms)" in caplog.text


def test_a_cpu_where_bf16_is_slow_gets_fp32(probe, tmp_path):
    probe.result = AVX2
    decision = bf16_decision("cpu", tmp_path)
    assert decision.bf16 is False and decision.probe["bf16_ms"] == 78.0
    assert decision.describe() == "bf16 autocast off (probe: fp32 10.0 ms, bf16 78.0 ms)"
    probe.result = {"fp32_ms": 10.0, "bf16_ms": 7.0}  # 1.43x: too little to be worth bf16's rounding
    precision._DECIDED.clear()
    assert bf16_decision("cpu", tmp_path / "other").bf16 is False


def test_the_probe_is_cached_per_machine(probe, tmp_path, monkeypatch):
    first = bf16_decision("cpu", tmp_path)
    precision._DECIDED.clear()  # a new process: the disk cache answers
    probe.result = AVX2  # would decide otherwise if it ran again
    again = bf16_decision("cpu", tmp_path)
    assert probe.calls == 1 and again.bf16 is first.bf16 is True and again.probe["cached"] is True
    (cached,) = (tmp_path / "precision").glob("cpu-*.json")
    assert json.loads(cached.read_text())["probe"] == NATIVE
    assert bf16_decision("cpu", tmp_path) is again  # the same process does not even read the file

    other = {**precision.machine_key(), "torch": "9.9.9"}  # another torch (or CPU, flags, kernel variables)
    monkeypatch.setattr(precision, "machine_key", lambda: other)
    assert bf16_decision("cpu", tmp_path).bf16 is False and probe.calls == 2
    assert len(list((tmp_path / "precision").glob("cpu-*.json"))) == 2


def test_the_machine_key_names_cpu_flags_torch_and_kernel_variables(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    key = precision.machine_key()
    assert set(key) == {"cpu", "flags", "torch", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"}
    assert key["torch"] == torch.__version__ and key["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_the_real_probe_measures_both_in_milliseconds():
    result = precision.probe_cpu(seconds=0.05)
    assert set(result) == {"fp32_ms", "bf16_ms"}
    assert 0 < result["fp32_ms"] < 5000 and 0 < result["bf16_ms"] < 5000
    assert torch.get_num_threads() >= 1  # the probe's one thread is undone


def test_cuda_decides_by_the_gpus_bf16_support(probe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert bf16_decision("cuda").bf16 is True and bf16_decision(torch.device("cuda", 1)).bf16 is True
    assert bf16_decision("cuda").describe() == "bf16 autocast on (cuda: bf16 supported)"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100
    assert bf16_decision("cuda").bf16 is False
    assert bf16_decision("mps").bf16 is False
    assert probe.calls == 0


def test_the_environment_variable_decides_without_probing(probe, tmp_path, monkeypatch):
    monkeypatch.setenv(precision.ENV_OVERRIDE, "1")
    assert bf16_decision("cpu", tmp_path).bf16 is True
    monkeypatch.setenv(precision.ENV_OVERRIDE, "0")
    decision = bf16_decision("cpu", tmp_path)
    assert decision.bf16 is False and decision.reason == "DEEPALIGN_CPU_BF16=0" and probe.calls == 0


def test_explicit_settings_override_auto(probe, tmp_path):
    probe.result = NATIVE  # auto would say bf16
    assert train_bf16(False, "cpu", tmp_path) is False and train_bf16(True, "cpu", tmp_path) is True
    assert generation_autocast("float32", torch.float32, "cpu", tmp_path) is None
    assert generation_autocast("bfloat16", torch.float32, "cpu", tmp_path) is torch.bfloat16
    assert generation_autocast("float16", torch.float32, "cpu", tmp_path) is torch.float16
    assert probe.calls == 0
    assert train_bf16("auto", "cpu", tmp_path) is True
    assert generation_autocast("auto", torch.float32, "cpu", tmp_path) is torch.bfloat16
    assert generation_autocast("auto", torch.bfloat16, "cpu", tmp_path) is None  # the model's own dtype
    probe.result = AVX2
    precision._DECIDED.clear()
    assert train_bf16("auto", "cpu", tmp_path / "avx2") is False
    assert generation_autocast("auto", torch.float32, "cpu", tmp_path / "avx2") is None


def test_auto_reaches_the_trainer_and_the_engine(probe, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPALIGN_CACHE", str(tmp_path))  # where the engine and trainer cache the probe
    cfg = validate(compose_config(["model=tiny", "logger=none", "train.bf16=auto"]))
    assert cfg.train.bf16 == "auto"
    assert training_arguments(cfg.train, tmp_path / "out").bf16 is True
    assert training_arguments(replace(cfg.train, bf16=False), tmp_path / "out").bf16 is False
    tiny = load_model(cfg.model)
    assert make_engine(GenerationConfig(dtype="auto"), tiny, progress=False).autocast is torch.bfloat16
    assert make_engine(GenerationConfig(dtype="float32"), tiny, progress=False).autocast is None
    probe.result = AVX2
    precision._DECIDED.clear()
    monkeypatch.setenv("DEEPALIGN_CACHE", str(tmp_path / "avx2"))
    assert training_arguments(cfg.train, tmp_path / "out").bf16 is False
    assert make_engine(GenerationConfig(dtype="auto"), tiny, progress=False).autocast is None


def test_env_json_records_the_decision(probe, tmp_path):
    overrides = ["model=tiny", "logger=none", f"paths.cache_dir={tmp_path}"]
    record = environment_record([], validate(compose_config([*overrides, "train.bf16=auto"])))
    assert record["precision"]["decision"] == "bf16" and record["precision"]["device"] == "cpu"
    assert record["precision"]["probe"]["fp32_ms"] == 10.2 and record["precision"]["probe"]["bf16_ms"] == 5.9
    assert "reason" in record["precision"] and "native" in record["precision"]
    explicit = validate(compose_config([*overrides, "train.bf16=false", "generation.dtype=float32"]))
    assert "precision" not in environment_record([], explicit)  # nothing left to auto


def test_a_bad_bf16_setting_names_the_key():
    with pytest.raises(ConfigError, match=r"^train\.bf16: 'yes' is not true, false or auto"):
        validate(compose_config(["model=tiny", "logger=none", "stages=[quickstart]", "train.bf16=yes"]))
