"""The `deepalign` entrypoint: a Hydra app that validates the config, then runs the configured stages."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from deepalign.config import ConfigError, DeepAlignConfig, register_configs, validate
from deepalign.data import DataError
from deepalign.rundir import (
    MetricsFile,
    environment_record,
    redact,
    scrub_files,
    write_json_atomic,
    write_text_atomic,
)
from deepalign.tracking import NullTracker, start_tracker

log = logging.getLogger("deepalign")
register_configs()


@dataclass
class RunContext:
    """What a stage gets: the typed config, the run dir, the metrics file and tracker, a shared model."""

    config: DeepAlignConfig
    run_dir: Path
    metrics: MetricsFile
    tracker: NullTracker
    raw_config: DictConfig | None = None  # the composed config, for stages that derive sub-runs from it
    finished: set[str] = field(default_factory=set)  # stages done in this run dir
    _models: dict[str, Any] = field(default_factory=dict)

    def model(self):
        """The run's model, loaded once and shared by the stages: the trained one once `train` is done."""
        if "model" not in self._models:
            from deepalign.models import load_model

            cfg = self.config.model
            if "train" in self.finished:
                trained, adapter = self.run_dir / "model", self.run_dir / "adapter"
                if (trained / "config.json").is_file():
                    cfg = dataclasses.replace(
                        cfg, source="hf", path=str(trained), tokenizer=None, adapter_path=None
                    )
                else:
                    cfg = dataclasses.replace(cfg, adapter_path=str(adapter))
            self._models["model"] = load_model(cfg)
        return self._models["model"]

    def model_path(self) -> str | None:
        """Where the run's model weights live (a folder or hub id), for engines that load their own copy."""
        source = self.model().source
        return None if source.startswith("random:") else source

    def forget_model(self) -> None:
        """Drop the loaded model (the next `model()` call loads again, e.g. the freshly trained one)."""
        self._models.pop("model", None)


def _stage_registry() -> dict[str, Callable[[RunContext], dict[str, float]]]:
    from deepalign.stages.analyze import run_analyze
    from deepalign.stages.attack import run_attack
    from deepalign.stages.probe import run_probe
    from deepalign.stages.quickstart import run_quickstart
    from deepalign.stages.train import run_train
    from deepalign.stages.utility import run_utility

    return {
        "train": run_train,
        "probe": run_probe,
        "attack": run_attack,
        "analyze": run_analyze,
        "utility": run_utility,
        "quickstart": run_quickstart,
    }


def _fingerprint(config: dict[str, Any]) -> str:
    """A hash of everything a stage's result depends on (the tracker settings excluded)."""
    relevant = {k: v for k, v in config.items() if k not in ("logger", "launcher")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def preflight(config: DeepAlignConfig) -> None:
    """Checks that read files or the environment, done before any model loads: judges' keys and packages,
    the evaluation set's rows."""
    if "attack" in config.stages:
        from deepalign.judges import check_judges

        check_judges(config.judge)
    if "attack" in config.stages or "analyze" in config.stages:
        from deepalign.attacks import read_eval_items

        read_eval_items(config.eval)


def run(cfg: DictConfig, run_dir: Path, run_name: str | None = None) -> dict[str, float]:
    """Validate `cfg`, record the run, run every stage not already done with this config; return metrics."""
    config = validate(cfg)  # fails here, naming the key, before anything heavy happens
    preflight(config)
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    env = environment_record()
    write_json_atomic(run_dir / "env.json", env)
    if (run_dir / ".hydra").is_dir():
        scrub_files(run_dir / ".hydra")

    stages = _stage_registry()
    metrics = MetricsFile(run_dir / "metrics.json")
    state_path = run_dir / "stages.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    fingerprint = _fingerprint(resolved)
    tracker = start_tracker(config.logger, run_dir, {**resolved, "env": env}, name=run_name)
    ctx = RunContext(
        config=config,
        run_dir=run_dir,
        metrics=metrics,
        tracker=tracker,
        raw_config=cfg,
        finished={name for name, fp in state.items() if fp == fingerprint},
    )
    exit_code = 1
    try:
        for name in config.stages:
            if state.get(name) == fingerprint:
                log.info("stage %s: already done in %s with this config, skipped", name, run_dir)
                continue
            log.info("stage %s: start", name)
            start = time.perf_counter()
            values = stages[name](ctx)
            values[f"time/{name}_s"] = round(time.perf_counter() - start, 3)
            metrics.update(values)
            tracker.log(values)
            state[name] = fingerprint
            ctx.finished.add(name)
            write_json_atomic(state_path, state)
            log.info("stage %s: done in %.1fs", name, values[f"time/{name}_s"])
        tracker.summary(metrics.values)
        exit_code = 0
    finally:
        tracker.finish(exit_code=exit_code)
    log.info("run dir: %s", run_dir)
    return dict(metrics.values)


@hydra.main(version_base="1.3", config_path="pkg://deepalign.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.logger.group is None:
        # one W&B group per sweep, each point a run named by its overrides
        cfg.logger.group = "sweep-" + Path(hydra_cfg.sweep.dir).as_posix().replace("/", "_").strip("_")
    try:
        run(cfg, run_dir, run_name=hydra_cfg.job.override_dirname or None)
    except ConfigError as err:
        print(f"deepalign: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except DataError as err:
        print(f"deepalign: data error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    """Console script `deepalign` and `python -m deepalign`."""
    _hydra_main()
