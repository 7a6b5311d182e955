"""The `deepalign` entrypoint: a Hydra app that validates the config, then runs the configured stages."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
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
from deepalign.launch import end_process_group, launch, process_rank, world_size
from deepalign.objective import check_objective, objective_value
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
    main_process: bool = True  # global rank 0: the one that writes the run's records (launcher=torchrun, ...)
    finished: set[str] = field(default_factory=set)  # stages done in this run dir
    fingerprint: str = ""  # of this config and its inputs (see `_fingerprint`)
    resolved: dict[str, Any] = field(default_factory=dict)  # the resolved config (secrets redacted)
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

    def model_id(self) -> str:
        """A hash naming the run's current weights and how generation runs on them: the model config, and
        once trained the data, loss and training settings. Stored generations of another id are stale."""
        c = self.config
        parts: dict[str, Any] = {"model": c.model, "generation": (c.generation.backend, c.generation.dtype)}
        if "train" in self.finished:
            parts.update(data=c.data, loss=c.loss, train=c.train, seed=c.seed)
        blob = json.dumps(parts, sort_keys=True, default=lambda o: dataclasses.asdict(o))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fingerprint_of(self, *sections: str) -> str:
        """The fingerprint of some sections of the config only (with their input files), e.g. what the
        trained weights depend on: a changed evaluation setting keeps the training checkpoints valid."""
        return _fingerprint({k: self.resolved.get(k) for k in sections})

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


def _digest(path: Path, listing: bool) -> str:
    """sha256 of a file's bytes, or (`listing`) of a folder's file names, sizes and modification times."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif listing:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = f.stat()
            h.update(f"{f.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _inputs(node: Any, out: dict[str, str], folders: bool) -> dict[str, str]:
    """Digests of the local files a config names (and with `folders`, of the folders: model weights)."""
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else [node]
    for value in values:
        if isinstance(value, (dict, list)):
            _inputs(value, out, folders)
        elif isinstance(value, str) and value not in out and len(value) < 4096:
            path = Path(value).expanduser()
            if path.is_file() or (folders and path.is_dir()):
                out[value] = _digest(path, listing=folders)
    return out


def _fingerprint(config: dict[str, Any]) -> str:
    """A hash of everything a stage's result depends on: the config (less the tracker and launcher), the
    contents of the local files it names, and the state of the model folders it loads (a retrained model
    at the same path redoes what depends on it)."""
    relevant = {k: v for k, v in config.items() if k not in ("logger", "launcher", "sweep_objective")}
    inputs = _inputs({k: v for k, v in relevant.items() if k != "paths"}, {}, folders=False)
    relevant["inputs"] = _inputs([relevant.get("model"), relevant.get("analysis")], inputs, folders=True)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_writable(key: str, folder: Path) -> None:
    """Create `folder` if needed and a file in it, or raise ConfigError naming the key."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".deepalign-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: cannot write into {folder} ({err.strerror or err})") from None


def preflight(config: DeepAlignConfig, run_dir: Path | None = None) -> None:
    """Checks that read files or the environment, done before any model loads: the run dir and the cache
    dir are writable, judges' keys and packages, the evaluation set's rows (long enough for the prefill
    depths), the rows of the training data's local files."""
    if run_dir is not None:
        _check_writable("hydra.run.dir (the run dir, under paths.output_dir)", run_dir)
    _check_writable("paths.cache_dir", Path(config.paths.cache_dir).expanduser())
    if "train" in config.stages:
        from deepalign.data import read_component

        if not config.data.components:
            raise DataError("data.components: no training data configured (choose a data= preset)")
        for name, comp in config.data.components.items():
            local = Path(comp.source).suffix.lower() in (".jsonl", ".json", ".csv")
            if local or comp.source.startswith("demo:"):  # hub sets are read by the stage
                read_component(comp, f"data.components.{name}")
    if "attack" in config.stages:
        from deepalign.judges import check_judges

        check_judges(config.judge)
    if "attack" in config.stages or "analyze" in config.stages:
        from deepalign.attacks import check_prefill_depths, read_eval_items

        items = read_eval_items(config.eval)
        prefill = config.attack.prefill if "attack" in config.stages else None
        if prefill is not None and any(prefill.depths):  # needs the tokenizer only, not the model
            from deepalign.models import load_tokenizer

            check_prefill_depths(items, prefill.depths, load_tokenizer(config.model))


def run(
    cfg: DictConfig,
    run_dir: Path,
    run_name: str | None = None,
    *,
    argv: list[str] | None = None,
    checked: bool = False,
) -> dict[str, float]:
    """Validate `cfg`, record the run, run every stage not already done with this config; return metrics.

    In a launched run (RANK / WORLD_SIZE set) every rank runs `train`; rank 0 alone writes config.yaml,
    env.json, metrics.json, stages.json and the W&B run, and runs the stages after `train` (the other
    ranks return once training is done). `checked`: the parent already ran the preflight checks;
    `argv`: the command line to record (the parent's).
    """
    config = validate(cfg)  # fails here, naming the key, before anything heavy happens
    if not checked:
        preflight(config, run_dir)
    main_process, distributed = process_rank() == 0, world_size() > 1
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    run_dir.mkdir(parents=True, exist_ok=True)
    env = environment_record(argv)
    if main_process:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
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
        main_process=main_process,
        finished={name for name, fp in state.items() if fp == fingerprint},
        fingerprint=fingerprint,
        resolved=resolved,
    )
    exit_code = 1
    try:
        for name in config.stages:
            if state.get(name) == fingerprint:
                log.info("stage %s: already done in %s with this config, skipped", name, run_dir)
                continue
            if not main_process and name != "train":
                break  # evaluation runs on rank 0 alone (train is the first stage: validated)
            log.info("stage %s: start", name)
            start = time.perf_counter()
            values = stages[name](ctx)
            values[f"time/{name}_s"] = round(time.perf_counter() - start, 3)
            ctx.finished.add(name)
            if distributed and name == "train":
                end_process_group()  # the ranks part here; rank 0 evaluates on its own
            if not main_process:
                continue
            metrics.update(values)
            tracker.log(values)
            state[name] = fingerprint
            write_json_atomic(state_path, state)
            log.info("stage %s: done in %.1fs", name, values[f"time/{name}_s"])
        tracker.summary(metrics.values)
        exit_code = 0
    finally:
        tracker.finish(exit_code=exit_code)
    log.info("run dir: %s", run_dir)
    return dict(metrics.values)


def start_workers(cfg: DictConfig, run_dir: Path, run_name: str | None) -> None:
    """`launcher=torchrun|accelerate|deepspeed`: check the config once here, then start the workers
    (`python -m deepalign.worker RUN_DIR`) on this run dir; exits with their code if they fail."""
    config = validate(cfg)
    preflight(config, run_dir)
    if (run_dir / ".hydra").is_dir():
        scrub_files(run_dir / ".hydra")
    lc = config.launcher
    if lc.nnodes > 1:
        log.info("node %d of %d: all nodes need this run dir, shared: %s", lc.node_rank, lc.nnodes, run_dir)
    code = launch(cfg, lc, run_dir, run_name)
    if code:
        print(f"deepalign: {lc.name} workers failed (exit {code}); see {run_dir}", file=sys.stderr)
        raise SystemExit(code)


@hydra.main(version_base="1.3", config_path="pkg://deepalign.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.logger.group is None:
        # one W&B group per sweep, each point a run named by its overrides
        cfg.logger.group = "sweep-" + Path(hydra_cfg.sweep.dir).as_posix().replace("/", "_").strip("_")
    run_name = hydra_cfg.job.override_dirname or None
    try:
        check_objective(cfg.sweep_objective, hydra_cfg.sweeper)
        if cfg.launcher.name == "local":
            run(cfg, run_dir, run_name=run_name)
        else:
            start_workers(cfg, run_dir, run_name)
        return objective_value(cfg.sweep_objective, run_dir)  # what an optimising sweeper (optuna) reads
    except ConfigError as err:
        print(f"deepalign: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except DataError as err:
        print(f"deepalign: data error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    """Console script `deepalign` and `python -m deepalign`."""
    _hydra_main()
