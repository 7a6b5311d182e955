"""What a stage's registration tells the runner, built-ins and plugins alike: on which ranks it runs
(`ranks`), whether it runs in one process only (`single_process`), its checks at validation (`check`) and
before any model loads (`preflight`), what its fingerprint adds (`fingerprint`) and the key of its config
section (`key`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from conftest import compose_config
from omegaconf import OmegaConf
from test_training import _free_port

from deepalign import cli
from deepalign.config import (
    AnalysisConfig,
    ConfigError,
    ProbeConfig,
    QuickstartConfig,
    UtilityConfig,
    check,
    validate,
)
from deepalign.context import RunContext
from deepalign.data import DataError
from deepalign.plugins import STAGES, PluginError, register_stage
from deepalign.rundir import MetricsFile
from deepalign.tracking import NullTracker

TINY = ["model=tiny", "logger=none"]

RANK_STAGES = """\
# rank_stages.py: one stage every rank runs, then one that rank 0 runs alone
import os
import time

from deepalign.plugins import register_stage

if os.environ.get("RANK") == "1":  # rank 1 starts once rank 0 is done and has recorded both stages
    time.sleep(3)


@register_stage("everyone", sections=("seed",), ranks="all")
def everyone(ctx):
    (ctx.run_dir / f"rank-{os.environ.get('RANK', '0')}.txt").write_text("ran\\n")
    return {"everyone/ran": 1.0}


@register_stage("alone", sections=("seed",))
def alone(ctx):
    (ctx.run_dir / f"alone-{os.environ.get('RANK', '0')}.txt").write_text("ran\\n")
    return {"alone/ran": 1.0}
"""


@dataclass
class GaugeConfig:
    level: int = 1


def check_gauge(config) -> None:
    level = config.gauge_settings.level
    check(level >= 1, "gauge_settings.level", f"must be >= 1, got {level}")


@pytest.fixture
def stages(monkeypatch):
    """The stage registry as it is now, restored after the test (the stages a test registers go away)."""
    list(STAGES)  # the built-ins first
    monkeypatch.setattr(STAGES, "_specs", dict(STAGES._specs))
    yield STAGES
    compose_config()  # the schema without the test's sections again


def register_gauge(events: list[str], **kwargs) -> None:
    """A stage `gauge` with its section under the key `gauge_settings`, recording what runs in `events`."""

    def gauge(ctx) -> dict[str, float]:
        events.append("stage")
        return {"gauge/level": float(ctx.config.gauge_settings.level)}

    register_stage(
        "gauge",
        sections=("gauge_settings",),
        config=GaugeConfig,
        key="gauge_settings",
        check=check_gauge,
        **kwargs,
    )(gauge)


# ---------------------------------------------------------------- ranks: a real two-process run on the CPU


def test_an_all_ranks_stage_runs_on_every_rank_and_a_main_stage_after_it_on_rank_0_alone(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "rank_stages.py").write_text(RANK_STAGES)
    path = [str(tmp_path / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    args = [
        *TINY,
        "plugins=[rank_stages]",
        "stages=[everyone,alone]",
        "launcher=torchrun",
        "launcher.nproc_per_node=2",
        f"launcher.master_port={_free_port()}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "hydra.run.dir=run",
    ]
    cmd = [sys.executable, "-m", "deepalign", *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.glob("rank-*.txt")) == ["rank-0.txt", "rank-1.txt"]
    assert sorted(p.name for p in run_dir.glob("alone-*.txt")) == ["alone-0.txt"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["everyone/ran"] == 1.0 and metrics["alone/ran"] == 1.0
    assert json.loads((run_dir / "stages.json").read_text()).keys() == {"everyone", "alone"}


def test_train_runs_on_every_rank_and_the_evaluation_stages_on_rank_0():
    assert STAGES.get("train", "stages").ranks == "all"
    assert {STAGES.get(name, "stages").ranks for name in ("probe", "attack", "analyze", "utility")} == {
        "main"
    }


def test_a_main_stage_before_an_all_ranks_stage_is_rejected_naming_both(stages):
    register_stage("everyone", sections=("seed",), ranks="all")(lambda ctx: {})
    launched = ["launcher=torchrun", "launcher.nproc_per_node=2"]
    with pytest.raises(
        ConfigError,
        match=r"^stages: with launcher=torchrun, stage everyone runs on every rank "
        r"and must come before probe, which rank 0 runs alone",
    ):
        validate(compose_config([*TINY, *launched, "stages=[probe,everyone]"]))
    with pytest.raises(
        ConfigError, match=r"^stages: .*stage train runs on every rank and must come before probe"
    ):
        validate(compose_config([*TINY, *launched, "stages=[probe,train]"]))
    assert (
        validate(compose_config([*TINY, *launched, "stages=[everyone,train,probe]"])).stages[0] == "everyone"
    )
    # one process runs every stage in the order given
    assert validate(compose_config([*TINY, "stages=[probe,everyone]"])).stages == ["probe", "everyone"]


def test_a_single_process_stage_is_rejected_with_a_multi_process_launcher(stages):
    register_stage("whole", single_process=True)(lambda ctx: {})
    with pytest.raises(
        ConfigError,
        match=r"^launcher\.name: the whole stage runs in one process; "
        r"launcher=accelerate runs",
    ):
        validate(
            compose_config([*TINY, "launcher=accelerate", "launcher.nproc_per_node=2", "stages=[whole]"])
        )
    assert STAGES.get("quickstart", "stages").single_process


def test_ranks_must_be_main_or_all(stages):
    with pytest.raises(PluginError, match=r"^stage 'odd': ranks must be one of main, all, got 'some'"):
        register_stage("odd", ranks="some")


# ---------------------------------------------------------------- check and preflight


def test_a_stage_check_fails_at_validation_naming_its_key(stages):
    register_gauge([])
    with pytest.raises(ConfigError, match=r"^gauge_settings\.level: must be >= 1, got 0"):
        validate(compose_config([*TINY, "stages=[gauge]", "gauge_settings.level=0"]))
    # only for a selected stage
    assert validate(compose_config([*TINY, "gauge_settings.level=0"])).gauge_settings.level == 0


def test_a_stage_preflight_runs_before_any_model_loads(stages, tmp_path, monkeypatch):
    events: list[str] = []

    def preflight(config, tokenizer) -> None:
        assert callable(tokenizer)
        events.append("preflight")
        if config.gauge_settings.level > 5:
            raise DataError("gauge_settings.level: no gauge reads that high")

    def load_model(*args, **kwargs):
        events.append("model")
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("deepalign.models.load_model", load_model)
    register_gauge(events, preflight=preflight)
    cfg = compose_config([*TINY, "stages=[gauge]", "gauge_settings.level=9", f"paths.cache_dir={tmp_path}"])
    with pytest.raises(DataError, match=r"^gauge_settings\.level: no gauge reads that high"):
        cli.run(cfg, tmp_path / "bad")
    assert events == ["preflight"] and not (tmp_path / "bad" / "metrics.json").exists()

    events.clear()
    cfg = compose_config([*TINY, "stages=[gauge]", "gauge_settings.level=3", f"paths.cache_dir={tmp_path}"])
    assert cli.run(cfg, tmp_path / "good")["gauge/level"] == 3.0
    assert events == ["preflight", "stage"]


# ---------------------------------------------------------------- fingerprint and key


def test_a_stage_fingerprint_adds_what_its_sections_do_not_show(stages, tmp_path):
    resolved = {"value": 1}
    register_gauge([], fingerprint=lambda ctx: {"resolved": resolved["value"]})
    cfg = compose_config([*TINY, "stages=[gauge]", f"paths.cache_dir={tmp_path}"])
    ctx = RunContext(
        config=validate(cfg),
        run_dir=tmp_path,
        metrics=MetricsFile(tmp_path / "metrics.json"),
        tracker=NullTracker(),
        resolved=OmegaConf.to_container(cfg, resolve=True),
    )
    first = ctx.stage_fingerprint("gauge")
    assert ctx.stage_fingerprint("gauge") == first
    resolved["value"] = 2
    assert ctx.stage_fingerprint("gauge") != first


def test_the_built_in_stages_register_their_sections_like_a_plugin(tmp_path):
    config = validate(compose_config(TINY))
    assert isinstance(config.probe, ProbeConfig) and isinstance(config.analysis, AnalysisConfig)
    assert isinstance(config.utility, UtilityConfig) and isinstance(config.quickstart, QuickstartConfig)
    assert STAGES.get("analyze", "stages").key == "analysis"
    saved = OmegaConf.to_yaml(compose_config(TINY))
    assert all(f"\n{key}:\n" in saved for key in ("probe", "analysis", "utility", "quickstart", "safelora"))


def test_two_stages_cannot_share_a_config_section(stages):
    with pytest.raises(PluginError, match=r"config section 'analysis' already belongs to stage 'analyze'"):
        register_stage("kl_again", config=GaugeConfig, key="analysis")(lambda ctx: {})
    with pytest.raises(PluginError, match=r"key 'gauge' names the section of a config; give config= too"):
        register_stage("keyed", key="gauge")
