"""The runner: validate a composed config, record the run, run its stages in order, skip what is done.

`run` is what `deepalign` does for one run dir (cli.py is the Hydra entrypoint around it); stages come from
the stage registry (deepalign/plugins.py) and each gets a `RunContext` (deepalign/context.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from deepalign.config import ConfigError, DeepAlignConfig, validate
from deepalign.context import RunContext
from deepalign.fingerprint import config_fingerprint
from deepalign.flops import gflop_so_far
from deepalign.judges.base import failed_judgments
from deepalign.launch import end_process_group, launch, process_rank, world_size
from deepalign.memory import PeakMemory, release_memory
from deepalign.plugins import STAGES
from deepalign.rundir import MetricsFile, environment_record, lock_run_dir, read_stage_state
from deepalign.storage.atomic import write_json_atomic, write_text_atomic
from deepalign.storage.redaction import redact, scrub_files
from deepalign.tracking import start_tracker

log = logging.getLogger("deepalign")
# a launched run's stages.json as the parent read it before starting the workers (see `_launch_state`)
LAUNCH_STATE_ENV = "DEEPALIGN_LAUNCH_STAGES"


def fingerprint(config: dict[str, Any]) -> str:
    """A hash of the whole config (less the tracker, the launcher and the keys that only say where things
    are: fingerprint.LOCATIONS), the contents of the local files it names and of the model and dataset folders
    it loads (a retrained model at the same path redoes what depends on it). Stages use
    `RunContext.stage_fingerprint`: the part of `fingerprinted(...)` they depend on."""
    return config_fingerprint(config)


def fingerprinted(resolved: dict[str, Any], config: DeepAlignConfig) -> dict[str, Any]:
    """The resolved config as the stages' fingerprints read it: each attack and judge instance as its
    validated typed config with `type`, its type's defaults filled in (a plugin whose default changes is run
    again), secrets redacted as in `resolved`."""
    typed = {
        section: {
            name: {"type": instance.type, **dataclasses.asdict(instance)}
            for name, instance in getattr(config, section).items()
        }
        for section in ("attack", "judge")
    }
    return {**resolved, **redact(typed)}


def _check_writable(key: str, folder: Path) -> None:
    """Create `folder` if needed and a file in it, or raise ConfigError naming the key."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".deepalign-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: cannot write into {folder} ({err.strerror or err})") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM preemption, `timeout`, `kill`), raised in the main thread by the `deepalign` command
    (cli.py): the run ends as on Ctrl-C, records kept and the run dir released, with exit code 143."""


def preflight(
    config: DeepAlignConfig, run_dir: Path | None = None, *, tokenizers: dict[str, Any] | None = None
) -> None:
    """Checks that read files or the environment, done before any model loads: the run dir and the cache
    dir are writable, the model folder holds weights, then each selected stage's own `preflight` (in the
    order the stages registered: the training data's rows, judges' keys and packages, the evaluation set's
    rows, long enough for the prefill depths and short enough for the model's context, ...).
    `tokenizers`: loaded tokenizers by model config, kept across calls (a sweep's points share them)."""
    if run_dir is not None:
        _check_writable("hydra.run.dir (the run dir, under paths.output_dir)", run_dir)
    _check_writable("paths.cache_dir", Path(config.paths.cache_dir).expanduser())
    if config.model.source == "hf" and config.model.path:
        from deepalign.models import check_model_folder

        check_model_folder("model.path", config.model.path)
    loaded = {} if tokenizers is None else tokenizers

    def tokenizer() -> Any:  # loaded once, where a check needs it
        from deepalign.models import load_tokenizer

        if repr(config.model) not in loaded:
            loaded[repr(config.model)] = load_tokenizer(config.model)
        return loaded[repr(config.model)]

    for name, spec in STAGES.items():
        if name in config.stages and spec.preflight is not None:
            spec.preflight(config, tokenizer)


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
    In a launched run (RANK / WORLD_SIZE set) every rank runs the stages registered with `ranks="all"`
    (train), which come first; rank 0 alone writes config.yaml, env.json, metrics.json, stages.json and the
    W&B run, and runs the stages after them (the other ranks return once these are done). `checked`: a
    worker of a launched run, whose parent already ran the preflight checks and holds the lock; `argv`: the
    command line to record (the parent's).
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
    # the records of earlier runs here, read before anything is written (a directory in a record's place
    # stops the run as it found it)
    metrics = MetricsFile(run_dir / "metrics.json")
    state_path = run_dir / "stages.json"
    state = read_stage_state(state_path)
    if checked and LAUNCH_STATE_ENV in os.environ:  # a worker: done is what was done when the launch began
        state = json.loads(os.environ[LAUNCH_STATE_ENV])
    env = environment_record(argv, config)  # with the precision decision where a setting is auto
    if main_process:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
        write_json_atomic(run_dir / "env.json", env)
        if (run_dir / ".hydra").is_dir():
            scrub_files(run_dir / ".hydra")

    tracker = start_tracker(config.logger, run_dir, {**resolved, "env": env}, name=run_name)
    ctx = RunContext(
        config=config,
        run_dir=run_dir,
        metrics=metrics,
        tracker=tracker,
        raw_config=cfg,
        main_process=main_process,
        resolved=fingerprinted(resolved, config),
    )
    # a stage's record counts only under its current fingerprint (an old-format one: re-checked by running);
    # the models that finished stages saved are what later stages load (in the order they ran)
    for name in state:
        spec = STAGES.get(name, "stages") if name in STAGES else None
        if spec is not None and spec.model_dir and state[name] == ctx.stage_fingerprint(name):
            ctx.finished[name] = None
    specs = [STAGES.get(name, "stages") for name in config.stages]
    last_all_ranks = max((i for i, spec in enumerate(specs) if spec.ranks == "all"), default=-1)
    exit_code = 1
    try:
        for i, (name, spec) in enumerate(zip(config.stages, specs)):
            stage_fingerprint = ctx.stage_fingerprint(name)
            if state.get(name) == stage_fingerprint:
                ctx.finished[name] = None
                log.info("stage %s: already done in %s with this config, skipped", name, run_dir)
                continue
            if not main_process and spec.ranks != "all":
                break  # rank 0 alone runs the rest (the stages of every rank come first: validated)
            log.info("stage %s: start", name)
            start = time.perf_counter()
            work = gflop_so_far()
            with PeakMemory() as peak:
                values = spec.fn(ctx)
            if not isinstance(values, dict):
                raise TypeError(f"stage {name} returned {type(values).__name__}, not a dict of metrics")
            values[f"time/{name}_s"] = round(time.perf_counter() - start, 3)
            values[f"flops/{name}/gflop"] = round(gflop_so_far() - work, 1)
            values.update(peak.metrics(f"memory/{name}"))
            ctx.finished.pop(name, None)
            ctx.finished[name] = None
            if spec.model_dir:
                ctx.forget_model()  # later stages load the model it saved, and the memory goes back
            else:
                release_memory()  # what the stage freed (engines, caches) goes back before the next one
            if distributed and i == last_all_ranks:
                end_process_group()  # the ranks part here; rank 0 runs the rest on its own
            if not main_process:
                continue
            metrics.update(values)
            tracker.log(values)
            failed = failed_judgments(values)  # not done: its next run asks for them again
            if failed:
                log.warning("stage %s: %d judgments failed; run it again to retry them", name, failed)
            else:
                state[name] = stage_fingerprint
                write_json_atomic(state_path, state)
            log.info("stage %s: done in %.1fs", name, values[f"time/{name}_s"])
        tracker.summary(metrics.values)
        exit_code = 0
    except KeyboardInterrupt as err:
        exit_code = 143 if isinstance(err, Terminated) else 130  # as a shell reports SIGTERM, Ctrl-C
        raise
    finally:
        tracker.finish(exit_code=exit_code)
    log.info("run dir: %s", run_dir)
    return dict(metrics.values)


@contextlib.contextmanager
def _launch_state(run_dir: Path) -> Iterator[None]:
    """The run dir's stages.json as read now, in the environment of the workers about to start: every rank
    skips the same stages. Rank 0 records each stage as it finishes, and another rank may start only after
    that (a stage of every rank that does not wait for the others): reading the file, it would skip it."""
    os.environ[LAUNCH_STATE_ENV] = json.dumps(read_stage_state(run_dir / "stages.json"))
    try:
        yield
    finally:
        os.environ.pop(LAUNCH_STATE_ENV, None)


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
        with lock_run_dir(run_dir), _launch_state(run_dir):
            code = launch(cfg, lc, run_dir, run_name)
    else:
        with _launch_state(run_dir):
            code = launch(cfg, lc, run_dir, run_name)
    if code:
        print(f"deepalign: {lc.name} workers failed (exit {code}); see {run_dir}", file=sys.stderr)
        raise SystemExit(code)
