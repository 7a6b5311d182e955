"""The `deepalign` entrypoint: a Hydra app around the runner (deepalign/runner.py), and its error reports.

Plugins named on the command line (`plugins=[mod,...]`) and installed ones (entry-point group
`deepalign.plugins`) are imported before Hydra composes the config, so their stages' config sections join the
schema and `deepalign --help` lists their components.

SIGTERM (SLURM preemption, `timeout`) ends a run as Ctrl-C does: the records kept, the run dir released, the
same "interrupted; rerun ... to resume" on stderr and in the run's log, exit code 143 (130 for Ctrl-C).

A sweep (`deepalign -m`, Hydra's basic sweeper) is checked whole before its first point runs: every point
composed as Hydra's launcher will compose it, validated and preflighted; a bad point stops the sweep before
anything runs, naming each bad point. A point that fails as it runs does not stop the others; the sweep
ends with a summary of the points that failed (exit code 1).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from deepalign.config import ConfigError, register_configs, validate
from deepalign.data import DataError
from deepalign.objective import check_objective, objective_value
from deepalign.plugins import describe, load_plugins
from deepalign.rundir import RunDirError
from deepalign.runner import Terminated, preflight, run, start_workers
from deepalign.storage.redaction import redact, redact_logs, scrub_run_dir

__all__ = ["main", "run", "start_workers"]
OmegaConf.register_new_resolver("deepalign_components", describe, replace=True)  # for --help
log = logging.getLogger("deepalign")
# the errors a run reports as its own: one line naming the key or file, exit code 2
REPORTED = ((ConfigError, "config error"), (DataError, "data error"), (RunDirError, "run dir error"))
REPORTED_ERRORS = tuple(cls for cls, _ in REPORTED)


class PointFailed(RuntimeError):
    """A sweep point that failed, in a launcher that runs the points in processes of their own (SLURM):
    Hydra records it as that job's failure while the other points go on."""


@dataclass
class Sweep:
    """The points of a `deepalign -m` sweep: their labels (the overrides that tell them apart, by job
    number), and those that failed in this process (Hydra's basic launcher), as lines of the summary."""

    labels: dict[int, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


SWEEP = Sweep()


@hydra.main(version_base="1.3", config_path="pkg://deepalign.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else None
    redact_logs()  # deepalign.log and the console
    scrub_run_dir(run_dir, sweep_dir)  # Hydra's .hydra/ copies hold the command line as typed
    if multirun and cfg.logger.group is None:
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
    except KeyboardInterrupt as err:  # Ctrl-C, and SIGTERM (`Terminated`): the whole sweep stops too
        message = f"deepalign: interrupted; rerun the same command (same hydra.run.dir={run_dir}) to resume"
        print(message, file=sys.stderr)
        _log_to_files(message)
        raise SystemExit(143 if isinstance(err, Terminated) else 130) from None
    except (Exception, SystemExit) as err:  # SystemExit: a launcher's workers that failed (said so)
        code, message = _report(err)
        if not multirun:
            raise SystemExit(code) from None
        line = f"#{hydra_cfg.job.num} {_label(hydra_cfg)} ({run_dir}): {message}"
        if not str(hydra_cfg.launcher.get("_target_", "")).endswith(".BasicLauncher"):
            raise PointFailed(line) from None  # its own process: Hydra collects it as this job's failure
        SWEEP.failed.append(line)  # the next points run; main() sums up
        return math.nan  # what an optimising sweeper records as a failed trial
    finally:  # every way out, also a failure before the run wrote its own (redacted) records
        scrub_run_dir(run_dir, sweep_dir)


def _report(err: BaseException) -> tuple[int, str]:
    """Say on stderr why the run failed (redacted): the run's own errors in one line, an unexpected one with
    its traceback (Hydra's report would print the overrides as typed, credentials included). Returns the exit
    code and the reason in one line."""
    if isinstance(err, SystemExit):  # said why already
        code = err.code if isinstance(err.code, int) else 1
        return code, f"exit code {code}"
    for cls, kind in REPORTED:
        if isinstance(err, cls):
            message = redact(f"{kind}: {err}")
            print(f"deepalign: {message}", file=sys.stderr)
            return 2, message
    training = sys.modules.get("deepalign.training")  # loaded if training ran
    if training is not None and isinstance(err, training.NonFiniteError):  # names the step
        message = redact(f"training diverged: {err}")
        print(f"deepalign: {message}", file=sys.stderr)
        return 1, message
    print(redact(traceback.format_exc()), end="", file=sys.stderr)
    return 1, redact(f"{type(err).__name__}: {err}")


def _label(hydra_cfg: Any) -> str:
    """A sweep point in words: the overrides that tell it from the other points."""
    return SWEEP.labels.get(hydra_cfg.job.num) or redact(hydra_cfg.job.override_dirname) or "(no overrides)"


def _log_to_files(message: str) -> None:
    """`message` into the run's log file (deepalign.log) and no other handler: stderr already has it."""
    record = log.makeRecord(log.name, logging.WARNING, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _fail(kind: str, err: Exception) -> NoReturn:
    print(redact(f"deepalign: {kind}: {err}"), file=sys.stderr)
    raise SystemExit(2) from None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread: a run ends as on
    Ctrl-C. A second SIGTERM ends the process at once. Outside the main thread: nothing changes."""

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def sweep_points(argv: list[str]) -> list[tuple[list[str], DictConfig]]:
    """The points of `deepalign -m ...`, in the order Hydra's basic sweeper launches them: each its overrides
    and its config (Hydra's node included), composed by Hydra's own config loader from Hydra's own expansion
    of the overrides (`BasicSweeper.split_arguments`), as the launcher composes them. Empty for a single run,
    for a sweeper that draws its points as it goes (optuna), and where Hydra itself rejects the command line
    (it then says why, as it would without this)."""
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        return []
    other = (args.cfg, args.help, args.hydra_help, args.info, args.shell_completion, args.config_path)
    if not args.multirun or any(other) or args.config_dir or args.experimental_rerun:
        return []
    try:
        with initialize_config_module(config_module="deepalign.conf", version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            master = loader.load_configuration(args.config_name or "config", args.overrides, RunMode.MULTIRUN)
            if not str(master.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
                return []
            params = [f"{k}={v}" for k, v in (master.hydra.sweeper.get("params") or {}).items()]
            overrides = OverridesParser.create(config_loader=loader).parse_overrides(params + args.overrides)
            (points,) = BasicSweeper.split_arguments(overrides, None)
            return [(point, loader.load_sweep_config(master, point)) for point in points]
    except Exception as err:  # Hydra reports it when it composes the same
        log.debug("the sweep is not checked before it runs: %s", err)
        return []


@contextlib.contextmanager
def _job_environment(job: DictConfig) -> Iterator[None]:
    """The environment a point runs in: this one plus its `hydra.job.env_set`."""
    env = {str(k): str(v) for k, v in (job.hydra.job.get("env_set") or {}).items()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_sweep(points: list[tuple[list[str], DictConfig]]) -> None:
    """Validate and preflight every point of a sweep before its first one runs (`deepalign.config.validate`,
    `runner.preflight`: the config, the files it names, the evaluation items against the model's context);
    with any point bad, say which and why, each on its own line, and exit 2: nothing has run. Labels the
    points (`SWEEP.labels`) for the summary at the end."""
    overrides = [point for point, _ in points]
    varying = {o for point in overrides for o in point if any(o not in other for other in overrides)}
    SWEEP.labels = {i: redact(" ".join(o for o in p if o in varying)) for i, p in enumerate(overrides)}
    bad, tokenizers = [], {}  # the points share their tokenizers
    for i, (_, job) in enumerate(points):
        HydraConfig.instance().set_config(job)  # for ${hydra:...} in the config, as the job has it
        task = copy.deepcopy(job)
        with read_write(task), open_dict(task):
            del task["hydra"]  # what the job function gets
        try:
            with _job_environment(job):
                preflight(validate(task), tokenizers=tokenizers)
        except REPORTED_ERRORS as err:
            kind = next(kind for cls, kind in REPORTED if isinstance(err, cls))
            point = f"#{i} ({SWEEP.labels[i]})" if SWEEP.labels[i] else f"#{i}"
            bad.append(redact(f"deepalign: {kind}: sweep point {point}: {err}"))
        except Exception as err:  # not the input's fault as far as we can tell: the point runs and says why
            log.debug("sweep point #%d not checked before the sweep: %s", i, err)
    if bad:
        print("\n".join(bad), file=sys.stderr)
        print(
            f"deepalign: {len(bad)} of {len(points)} sweep points are invalid; nothing was run (fix them or "
            "leave them out of the sweep)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def command_line_plugins(argv: list[str]) -> list[str]:
    """The modules of a `plugins=[a,b]` (or `+plugins=...`, `plugins=a`) override on the command line."""
    names: list[str] = []
    for arg in argv:
        match = re.fullmatch(r"\+{0,2}plugins=\[?([^\]]*)\]?", arg)
        if match:
            names = [n.strip().strip("'\"") for n in match.group(1).split(",") if n.strip()]
    return names


def main() -> None:
    """Console script `deepalign` and `python -m deepalign`."""
    try:
        load_plugins(command_line_plugins(sys.argv[1:]))
    except ConfigError as err:
        _fail("config error", err)
    register_configs()  # the schema, with the config sections of the stages registered by now
    SWEEP.labels, SWEEP.failed = {}, []
    points: list[tuple[list[str], DictConfig]] = []
    with sigterm_as_interrupt():
        try:
            points = sweep_points(sys.argv[1:])
            if points:
                check_sweep(points)
            _hydra_main()
        except KeyboardInterrupt as err:  # outside a run (a run says how to resume it)
            print("deepalign: interrupted", file=sys.stderr)
            raise SystemExit(143 if isinstance(err, Terminated) else 130) from None
    if SWEEP.failed:
        total = len(points) or "the"
        summary = "\n".join(f"  {line}" for line in SWEEP.failed)
        print(f"deepalign: {len(SWEEP.failed)} of {total} sweep points failed:\n{summary}", file=sys.stderr)
        raise SystemExit(1)
