"""Experiment tracking: W&B on rank 0 (offline unless asked otherwise), or nothing."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from deepalign.config import LoggerConfig
from deepalign.storage.redaction import redact

log = logging.getLogger(__name__)


class NullTracker:
    """Tracks nothing: `logger=none`, and every rank but 0."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def histogram(self, values: list[float]) -> Any:
        """A histogram value for `log` (W&B's own type under W&B)."""
        return values

    def image(self, path: Any) -> Any:
        """An image value for `log` (W&B's own type under W&B)."""
        return str(path)

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log `rows` under `key` as a table (a W&B Table): per-item outputs to read, filter and compare."""

    def line(
        self,
        key: str,
        xs: list[float],
        ys_by_series: dict[str, list[float | None]],
        x_name: str,
        y_name: str,
        title: str,
    ) -> None:
        """Log a line plot under `key`: one line per series, y against the shared `xs` (a None y is a point
        the series lacks). Under W&B a native chart of a table, so the same key of two runs overlays."""

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], name: str | None):
        import wandb

        self.wandb = wandb
        kwargs: dict[str, Any] = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=redact(cfg.group),
            job_type=cfg.job_type,
            name=redact(cfg.run_name or name),  # the default name is the overrides: anything typed there
            tags=redact(list(cfg.tags)),
            dir=str(run_dir),
            config=config,
            reinit="finish_previous",
            # W&B's own metadata would store the raw command line (and any secret typed into it);
            # the run's environment record goes into the config instead, redacted.
            settings=wandb.Settings(x_disable_meta=True),
        )
        try:
            self.run = wandb.init(mode=cfg.mode, **kwargs)
        except Exception as err:  # an unreachable server must not cost the run
            if cfg.mode != "online":
                raise
            log.warning("W&B online init failed (%s); logging offline instead", err)
            self.run = wandb.init(mode="offline", **kwargs)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(metrics)

    def histogram(self, values: list[float]) -> Any:
        return self.wandb.Histogram(values)

    def image(self, path: Any) -> Any:
        return self.wandb.Image(str(path))

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if len(rows) > self.wandb.Table.MAX_ROWS:
            log.warning(
                "W&B shows only the first %d of the %d rows of %s (all are in the run dir)",
                self.wandb.Table.MAX_ROWS,
                len(rows),
                key,
            )
        self.run.log({key: self.wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def line(
        self,
        key: str,
        xs: list[float],
        ys_by_series: dict[str, list[float | None]],
        x_name: str,
        y_name: str,
        title: str,
    ) -> None:
        # wandb.plot.line over a long table (x, y, series) rather than wandb.plot.line_series: it names the
        # y axis, and a series may lack points
        data = [
            [x, y, series]
            for series, ys in ys_by_series.items()
            for x, y in zip(xs, ys, strict=True)
            if y is not None
        ]
        table = self.wandb.Table(columns=[x_name, y_name, "series"], data=data)
        self.run.log({key: self.wandb.plot.line(table, x_name, y_name, stroke="series", title=title)})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def start_tracker(
    cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], name: str | None = None
) -> NullTracker:
    """The configured tracker on global rank 0 (from the RANK variable), a NullTracker elsewhere."""
    if cfg.name == "none" or cfg.mode == "disabled" or int(os.environ.get("RANK", "0")) != 0:
        return NullTracker()
    return WandbTracker(cfg, run_dir, config, name)
