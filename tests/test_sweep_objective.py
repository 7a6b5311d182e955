"""The value a run returns to an optimising Hydra sweeper (`sweep_objective`), and the Optuna sweeper config
(hydra/sweeper=optuna_beta; the optuna tests run only where hydra-optuna-sweeper is installed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from deepalign.config import ConfigError
from deepalign.objective import check_objective, objective_value

DEEPALIGN = str(Path(sys.executable).parent / "deepalign")
BASIC = OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"})
OPTUNA = OmegaConf.create({"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"})


def _require_optuna_sweeper() -> None:
    try:
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError:
        pytest.skip("hydra-optuna-sweeper not installed (pip install deepalign[sweep])")


def test_objective_is_the_named_metric_of_the_run(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"asr/none": 0.25, "asr/prefill/k=10": None}))
    assert objective_value("asr/none", tmp_path) == 0.25
    assert math.isnan(objective_value("asr/prefill/k=10", tmp_path))  # not finite: a failed trial for optuna
    assert objective_value(None, tmp_path) is None
    with pytest.raises(ConfigError, match=r"sweep_objective: 'asr/gcg' is not a metric .* asr/none"):
        objective_value("asr/gcg", tmp_path)


def test_an_optimising_sweeper_needs_an_objective():
    check_objective(None, BASIC)  # enumerating sweeps return nothing
    check_objective("asr/none", OPTUNA)
    with pytest.raises(ConfigError, match="sweep_objective"):
        check_objective(None, OPTUNA)


def test_sweep_objective_is_not_part_of_a_stages_fingerprint():
    from deepalign.runner import fingerprint as _fingerprint

    assert _fingerprint({"seed": 0, "sweep_objective": "asr/none"}) == _fingerprint({"seed": 0})


def test_optuna_sweeper_config_composes(tmp_path):
    _require_optuna_sweeper()
    out = subprocess.run(
        [DEEPALIGN, "hydra/sweeper=optuna_beta", "--cfg", "hydra"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    sweeper = yaml.safe_load(out.stdout)["hydra"]["sweeper"]
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["direction"] == "minimize"
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler" and sweeper["sampler"]["seed"] == 0
    assert sweeper["params"]["loss"] == "constrained"
    assert set(sweeper["params"]) >= {"loss.beta.prefix", "loss.beta.prefix_len", "sweep_objective"}


def test_optuna_sweep_of_two_trials_optimises_the_returned_metric(tmp_path):
    _require_optuna_sweeper()
    out = subprocess.run(
        [
            DEEPALIGN,
            "-m",
            "hydra/sweeper=optuna_beta",
            "hydra.sweeper.n_trials=2",
            "model=tiny",
            "logger=none",
            "stages=[probe]",
            "probe.max_new_tokens=2",
            "sweep_objective=probe/nll",
            f"paths.output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "WANDB_SILENT": "true"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (results,) = (tmp_path / "multirun").glob("*/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    nlls = [json.loads(p.read_text())["probe/nll"] for p in sorted(results.parent.glob("*/metrics.json"))]
    assert len(nlls) == 2 and best["best_value"] == pytest.approx(min(nlls))
    assert set(best["best_params"]) == {"loss.beta.prefix", "loss.beta.prefix_len"}
