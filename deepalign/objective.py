"""The number a Hydra sweeper optimises (e.g. hydra/sweeper=optuna_beta): one metric of the finished run,
named by `sweep_objective` and read back from the run dir's metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deepalign.config import ConfigError


def needs_objective(sweeper: Any) -> bool:
    """Whether Hydra's sweeper (`hydra.sweeper` of the job) optimises a returned value (optuna, nevergrad,
    ...) rather than enumerating points (the basic sweeper)."""
    target = str(getattr(sweeper, "_target_", "") or "")
    return bool(target) and not target.endswith("BasicSweeper")


def check_objective(name: str | None, sweeper: Any) -> None:
    """Fail before the run starts when an optimising sweeper has no metric to optimise."""
    if name is None and needs_objective(sweeper):
        raise ConfigError(
            "sweep_objective: this sweeper optimises a metric of each run; name one, "
            "e.g. sweep_objective=asr/none"
        )


def objective_value(name: str | None, run_dir: Path) -> float | None:
    """The metric `name` of the run in `run_dir` (NaN where it was not finite); None when no name is set."""
    if name is None:
        return None
    path = run_dir / "metrics.json"
    metrics: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if name not in metrics:
        known = ", ".join(sorted(metrics)) or "none (no metrics.json)"
        raise ConfigError(f"sweep_objective: {name!r} is not a metric of this run; it has {known}")
    value = metrics[name]
    return math.nan if value is None else float(value)
