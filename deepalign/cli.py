"""The `deepalign` entrypoint: a Hydra app around the runner (deepalign/runner.py), and its error reports.

Plugins named on the command line (`plugins=[mod,...]`) and installed ones (entry-point group
`deepalign.plugins`) are imported before Hydra composes the config, so their stages' config sections join the
schema and `deepalign --help` lists their components.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from deepalign.config import ConfigError, register_configs
from deepalign.data import DataError
from deepalign.objective import check_objective, objective_value
from deepalign.plugins import describe, load_plugins
from deepalign.rundir import RunDirError, redact, redact_logs, scrub_run_dir
from deepalign.runner import run, start_workers

__all__ = ["main", "run", "start_workers"]
OmegaConf.register_new_resolver("deepalign_components", describe, replace=True)  # for --help


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
    _hydra_main()
