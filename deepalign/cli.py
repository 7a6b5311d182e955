"""The `deepalign` entrypoint: a Hydra app that validates the config, then runs the configured stages."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from deepalign.config import ConfigError, DeepAlignConfig, register_configs, validate
from deepalign.data import DataError
from deepalign.fingerprint import STAGE_SECTIONS, config_fingerprint
from deepalign.launch import end_process_group, launch, process_rank, world_size
from deepalign.objective import check_objective, objective_value
from deepalign.rundir import (
    MetricsFile,
    RunDirError,
    environment_record,
    lock_run_dir,
    read_stage_state,
    redact,
    redact_logs,
    scrub_files,
    scrub_run_dir,
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

    def _model_config(self):
        """The model config the stages load: the run's trained model once `train` is done."""
        cfg = self.config.model
        if "train" in self.finished:
            trained, adapter = self.run_dir / "model", self.run_dir / "adapter"
            if (trained / "config.json").is_file():
                cfg = dataclasses.replace(
                    cfg, source="hf", path=str(trained), tokenizer=None, adapter_path=None
                )
            else:
                cfg = dataclasses.replace(cfg, adapter_path=str(adapter))
        return cfg

    def model(self):
        """The run's model, loaded once and shared by the stages: the trained one once `train` is done."""
        if "model" not in self._models:
            from deepalign.models import load_model

            self._models["config"] = self._model_config()
            self._models["model"] = load_model(self._models["config"])
        return self._models["model"]

    def model_path(self) -> str | None:
        """Where the run's model weights live (a folder or hub id), for engines that load their own copy."""
        source = self.model().source
        return None if source.startswith("random:") else source

    def model_id(self) -> str:
        """A hash naming the weights the stages use now, by content (`reference.model_fingerprint`: the
        files of the folder actually loaded, the adapter's, a random model's architecture and seed), and how
        generation runs on them. Stored generations of another id are stale."""
        if "id" not in self._models:
            from deepalign.reference import model_fingerprint

            loaded, c = self.model(), self.config
            weights = model_fingerprint(
                self._models["config"], loaded.source, loaded.model, c.paths.cache_dir
            )
            blob = json.dumps(
                {"weights": weights, "generation": [c.generation.backend, self.generation_dtype()]}
            )
            self._models["id"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._models["id"]

    def generation_dtype(self) -> str:
        """`generation.dtype` as this machine resolves it (`auto`: the precision decision, see
        deepalign/precision.py), so that answers generated in another precision are not reused."""
        c = self.config.generation
        if c.backend != "hf" or c.dtype != "auto":
            return c.dtype
        from deepalign.generation import _model_device
        from deepalign.precision import generation_autocast

        model = self.model().model
        cast = generation_autocast(c.dtype, model.dtype, _model_device(model), self.config.paths.cache_dir)
        return f"auto:{cast or model.dtype}".replace("torch.", "")

    def stage_fingerprint(self, name: str) -> str:
        """What stage `name`'s result depends on (`fingerprint.STAGE_SECTIONS` and the files these name);
        once `train` is done, also the train stage's fingerprint (the weights the stage evaluates)."""
        extra: dict[str, Any] = {}
        if name == "train" and self.config.train.bf16 == "auto":  # the precision it resolves to here
            from deepalign.models import resolve_device
            from deepalign.precision import train_bf16

            c = self.config
            extra["bf16"] = train_bf16("auto", resolve_device(c.model.device), c.paths.cache_dir)
        if name != "train" and "train" in self.finished:
            extra["trained"] = self.stage_fingerprint("train")
        return config_fingerprint(self.resolved, STAGE_SECTIONS.get(name), extra)

    def forget_model(self) -> None:
        """Drop the loaded model (the next `model()` call loads again, e.g. the freshly trained one)."""
        for key in ("model", "config", "id"):
            self._models.pop(key, None)


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
    """A hash of the whole config (less the tracker, launcher and paths), the contents of the local files it
    names and of the model folders it loads (a retrained model at the same path redoes what depends on it).
    Stages use `RunContext.stage_fingerprint`: the part of it they depend on."""
    return config_fingerprint(config)


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
    if config.model.source == "hf" and config.model.path:
        from deepalign.models import check_model_folder

        check_model_folder("model.path", config.model.path)
    if "analyze" in config.stages and config.analysis.reference:
        from deepalign.models import check_model_folder

        check_model_folder("analysis.reference", config.analysis.reference)
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

            tokenizer = load_tokenizer(config.model)
            check_prefill_depths(items, prefill.depths, tokenizer, system=config.data.system_prompt)


def run(
    cfg: DictConfig,
    run_dir: Path,
    run_name: str | None = None,
    *,
    argv: list[str] | None = None,
    checked: bool = False,
) -> dict[str, float]:
    """Validate `cfg`, record the run, run every stage not already done with this config; return metrics.

    The run dir is locked for the duration (`rundir.lock_run_dir`): a second process on it fails at once.
    In a launched run (RANK / WORLD_SIZE set) every rank runs `train`; rank 0 alone writes config.yaml,
    env.json, metrics.json, stages.json and the W&B run, and runs the stages after `train` (the other
    ranks return once training is done). `checked`: a worker of a launched run, whose parent already ran
    the preflight checks and holds the lock; `argv`: the command line to record (the parent's).
    """
    if not checked:
        _check_writable("hydra.run.dir (the run dir, under paths.output_dir)", run_dir)
    with contextlib.nullcontext() if checked else lock_run_dir(run_dir):
        return _run(cfg, run_dir, run_name, argv, checked)


def _run(
    cfg: DictConfig, run_dir: Path, run_name: str | None, argv: list[str] | None, checked: bool
) -> dict[str, float]:
    """`run` in a run dir already held."""
    config = validate(cfg)  # fails here, naming the key, before anything heavy happens
    if not checked:
        preflight(config, run_dir)
    main_process, distributed = process_rank() == 0, world_size() > 1
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    run_dir.mkdir(parents=True, exist_ok=True)
    env = environment_record(argv, config)  # with the precision decision where a setting is auto
    if main_process:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
        write_json_atomic(run_dir / "env.json", env)
        if (run_dir / ".hydra").is_dir():
            scrub_files(run_dir / ".hydra")

    stages = _stage_registry()
    metrics = MetricsFile(run_dir / "metrics.json")
    state_path = run_dir / "stages.json"
    state = read_stage_state(state_path)
    fingerprint = _fingerprint(resolved)
    tracker = start_tracker(config.logger, run_dir, {**resolved, "env": env}, name=run_name)
    ctx = RunContext(
        config=config,
        run_dir=run_dir,
        metrics=metrics,
        tracker=tracker,
        raw_config=cfg,
        main_process=main_process,
        fingerprint=fingerprint,
        resolved=resolved,
    )
    # a stage's record counts only under its current fingerprint (an old-format one: re-checked by running)
    if state.get("train") == ctx.stage_fingerprint("train"):
        ctx.finished.add("train")  # later stages load its model
    exit_code = 1
    try:
        for name in config.stages:
            stage_fingerprint = ctx.stage_fingerprint(name)
            if state.get(name) == stage_fingerprint:
                ctx.finished.add(name)
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
            state[name] = stage_fingerprint
            write_json_atomic(state_path, state)
            log.info("stage %s: done in %.1fs", name, values[f"time/{name}_s"])
        tracker.summary(metrics.values)
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 130  # as a shell reports Ctrl-C
        raise
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
    if lc.node_rank == 0:  # the run dir's one holder; the workers (and the other nodes) share it
        with lock_run_dir(run_dir):
            code = launch(cfg, lc, run_dir, run_name)
    else:
        code = launch(cfg, lc, run_dir, run_name)
    if code:
        print(f"deepalign: {lc.name} workers failed (exit {code}); see {run_dir}", file=sys.stderr)
        raise SystemExit(code)


@hydra.main(version_base="1.3", config_path="pkg://deepalign.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    redact_logs()  # deepalign.log and the console
    scrub_run_dir(run_dir, sweep_dir)  # Hydra's .hydra/ copies hold the command line as typed
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
        _fail("config error", err)
    except DataError as err:
        _fail("data error", err)
    except RunDirError as err:
        _fail("run dir error", err)
    except KeyboardInterrupt:
        resume = f"rerun the same command (same hydra.run.dir={run_dir}) to resume"
        print(f"deepalign: interrupted; {resume}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # Hydra's own report would print the overrides as typed, credentials included
        training = sys.modules.get("deepalign.training")  # loaded if training ran
        if training is not None and isinstance(err, training.NonFiniteError):  # names the step
            print(redact(f"deepalign: training diverged: {err}"), file=sys.stderr)
        else:
            print(redact(traceback.format_exc()), end="", file=sys.stderr)
        raise SystemExit(1) from None
    finally:  # every way out, also a failure before the run wrote its own (redacted) records
        scrub_run_dir(run_dir, sweep_dir)


def _fail(kind: str, err: Exception) -> NoReturn:
    print(redact(f"deepalign: {kind}: {err}"), file=sys.stderr)
    raise SystemExit(2) from None


def main() -> None:
    """Console script `deepalign` and `python -m deepalign`."""
    _hydra_main()
