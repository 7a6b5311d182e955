"""`deepalign-compare`: a table (markdown + CSV) and plots across runs or a multirun sweep.

    deepalign-compare outputs/multirun/2026-11-28/12-57-24          # every run below it
    deepalign-compare RUN_DIR RUN_DIR ... --out compare/ --metrics 'asr/*' 'kl/pos=1' 'train/last_loss'

Rows are runs (a folder with a metrics.json), named by their command-line overrides (.hydra/overrides.yaml);
columns are the overrides that differ between runs, then the chosen metrics. Plots: ASR against each swept
numeric override (e.g. loss.beta.prefix), ASR against prefill depth, KL per position overlaid; an ASR with
its Wilson interval in metrics.json (`<asr>/ci95_low`, `<asr>/ci95_high`) gets it as an error bar.

Seeds (`deepalign -m ... seed=0,1,2`): runs whose resolved configs (config.yaml) are equal but for every
`seed` key, the paths, logger and hydra settings and the run dir's own path (absolute, or relative to where
the run started) are one point. When some point has several seeds, rows are points: `n_seeds`, then per
metric `<metric>/mean`, `/std`, `/ci95_low`, `/ci95_high` (the 95% interval of the mean over seeds,
Student's t), and `<metric>/n_seeds` where a seed's value is missing (null: non-finite) and left out; the
plots draw the 95% intervals as error bars. A run inside another (a quickstart's models/<name>) is a point
of its own, never a seed of its parent or sibling.

Censored values (a metric `m` with a flag `m_censored` = 1: the value is a lower bound, e.g. `depth/k50`
when ASR never reached 50%; `m_left_censored` = 1: an upper bound) are shown as bounds, ">= 40" or "<= 5".
Over seeds, a censored seed counts at its bound, so the mean is a bound too: shown ">= mean" (or "<="),
with `<metric>/n_censored` seeds censored and no std or interval (they would treat bounds as measurements);
censored both ways, the mean is no bound and left empty.

Left out of the table, and listed below it and on stderr: a run whose metrics.json cannot be read (damaged,
truncated), one whose config's stages are not all recorded done (stages.json: it failed, or still runs; its
metrics.json may hold another config's numbers), a job of a multirun with no metrics.json (failed before its
first stage finished), and the jobs of a multirun (multirun.yaml, Hydra's basic sweeper) that never ran.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from deepalign.stats import mean_ci95

DEFAULT_METRICS = (
    "asr/*",
    "depth/asr_auc",
    "depth/k50",
    "depth/kl_tokens",
    "kl/pos=1",
    "kl/pos=5",
    "kl/pos=10",
    "utility/*",
    "train/last_loss",
)
NOT_A_POINT = ("paths", "logger", "hydra")  # config sections that say where and how a run is recorded
SEED = "seed"  # every key of this name, at any depth (model.seed, train.seed interpolate the top one)
WILSON = ("/n", "/ci95_low", "/ci95_high")  # a rate's companions in metrics.json: prompts and interval
AGGREGATES = ("mean", "std", "ci95_low", "ci95_high")
# a metric's censoring flags (`<metric><suffix>` = 1) and the side of the bound its value then is
CENSORING = {"_censored": ">=", "_left_censored": "<="}


def find_runs(paths: list[Path]) -> list[Path]:
    """Run dirs (with a metrics.json) at or below the given paths, sorted, without duplicates."""
    runs: set[Path] = set()
    for path in paths:
        if (path / "metrics.json").is_file():
            runs.add(path.resolve())
        runs.update(p.parent.resolve() for p in path.rglob("metrics.json"))
    return sorted(runs)


def run_overrides(run: Path) -> dict[str, str]:
    """The run's key=value overrides (Hydra's record), without the run-dir and output settings."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith(("hydra.", "paths.")):
            out[key] = value
    return out


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def read_metrics(run: Path) -> dict[str, Any]:
    """The run's metrics.json; a ValueError naming the file (and line) when it is damaged or truncated."""
    path = run / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}): damaged or truncated"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}): damaged") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: not a JSON object of metrics ({type(metrics).__name__}): damaged")
    return metrics


def unfinished_stages(run: Path) -> list[str]:
    """The stages of the run's config (config.yaml) that its stages.json does not record as done: all of
    them without a readable stages.json; [] where the stages are unknown (no readable config.yaml)."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    stages = config.get("stages") if isinstance(config, dict) else None
    if not isinstance(stages, list):
        return []
    try:
        done = json.loads((run / "stages.json").read_text())
    except (OSError, ValueError):
        done = {}
    return [str(s) for s in stages if not isinstance(done, dict) or s not in done]


def run_problem(run: Path) -> str | None:
    """Why a run with a metrics.json is left out of the table (unreadable, unfinished), or None."""
    try:
        read_metrics(run)
    except ValueError as err:
        return str(err)
    missing = unfinished_stages(run)
    if missing:
        return (
            f"{'stages' if len(missing) > 1 else 'stage'} {', '.join(missing)} not recorded as done in "
            "stages.json: the run failed, or still runs (its metrics.json may hold another config's numbers)"
        )
    return None


def sweep_jobs(sweep: Path) -> list[str] | None:
    """The overrides of each job of a multirun (its multirun.yaml), in job-number order, as the basic sweeper
    expands them (`hydra.sweeper.params`, then the command line's); None where they cannot be known (another
    sweeper, an unreadable multirun.yaml)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        hydra = (yaml.safe_load((sweep / "multirun.yaml").read_text()) or {}).get("hydra") or {}
        sweeper = hydra.get("sweeper") or {}
        if not _basic_sweeper(str(sweeper.get("_target_", ""))):
            return None
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides([*params, *(hydra["overrides"]["task"] or [])])
        batches = BasicSweeper.split_arguments(parsed, None)
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, HydraException):
        return None
    jobs = [job for batch in batches for job in batch]
    varying = [i for i in range(len(jobs[0]) if jobs else 0) if len({job[i] for job in jobs}) > 1]
    return [" ".join(job[i] for i in varying) for job in jobs]


def _basic_sweeper(target: str) -> bool:
    """Whether the sweeper class `target` expands jobs as Hydra's basic sweeper does (it or a subclass)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.utils import get_class

    if target.endswith(".BasicSweeper"):
        return True
    try:
        return issubclass(get_class(target), BasicSweeper)
    except Exception:  # a class that cannot be imported here: its jobs are unknown
        return False


def _job_number(job: Path) -> int | None:
    """A multirun job's number: `hydra.job.num` of its .hydra/hydra.yaml, else its folder name's first
    number (`3`, `3_4242`)."""
    try:
        number = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"]
        return int(number)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        match = re.match(r"(\d+)(_|$)", job.name)
        return int(match.group(1)) if match else None


def missing_runs(paths: list[Path]) -> list[tuple[Path, str]]:
    """(where, why) of every run dir at or below `paths` without a metrics.json (one with .hydra/: it failed
    before its first stage finished, or is still running) and of every job of a multirun that never ran."""
    found = set()
    for path in paths:
        for hydra in path.rglob(".hydra"):
            run = hydra.parent.resolve()
            if hydra.is_dir() and not (run / "metrics.json").is_file():
                found.add(
                    (run, "no metrics.json: the run failed before its first stage finished, or still runs")
                )
        for sweep in {p.parent.resolve() for p in path.rglob("multirun.yaml")}:
            jobs = sweep_jobs(sweep)
            if jobs is None:
                continue
            started = {_job_number(d) for d in sweep.iterdir() if (d / ".hydra").is_dir()}
            for number, overrides in enumerate(jobs):
                if number not in started:
                    what = f" ({overrides})" if overrides else ""
                    found.add((sweep, f"job {number} of {len(jobs)}{what} never ran (no run dir)"))
    return sorted(found, key=lambda item: (str(item[0]), _natural(item[1])))


def collect(runs: list[Path], patterns: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Rows (run, overrides, metrics), the overrides that vary between runs, and the matched metric names."""
    rows = []
    for run in runs:
        rows.append({"run": run, "overrides": run_overrides(run), "metrics": read_metrics(run)})
    keys = sorted({k for r in rows for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    names = sorted(
        {m for r in rows for m in r["metrics"] if any(fnmatch.fnmatch(m, p) for p in patterns)}, key=_natural
    )
    return rows, varying, names


def run_roots(runs: list[Path]) -> dict[Path, Path]:
    """Each run's outermost enclosing run among `runs`, itself when it lies in none (a quickstart's
    models/<name> sub-runs lie inside the quickstart run)."""
    found = set(runs)
    return {run: next((p for p in reversed(run.parents) if p in found), run) for run in runs}


def _hydra_runtime(root: Path) -> dict[str, Any]:
    """`hydra.runtime` of the run's .hydra/hydra.yaml (where it started, its output dir as written); {}."""
    try:
        runtime = yaml.safe_load((root / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    return runtime if isinstance(runtime, dict) else {}


def _relative_forms(root: Path) -> list[str]:
    """How a config can name the run dir `root` as a relative path: relative to where the run started
    (Hydra's `hydra.runtime.cwd`, .hydra/hydra.yaml) and from a relative `paths.output_dir` (config.yaml) on.
    Only these: a tail of the path that merely ends like it (`adapters/0` in job 0) is another folder."""
    forms = set()
    cwd = _hydra_runtime(root).get("cwd")
    if isinstance(cwd, str) and root.is_relative_to(Path(cwd).resolve()):
        forms.add(root.relative_to(Path(cwd).resolve()).as_posix())
    try:
        output_dir = (yaml.safe_load((root / "config.yaml").read_text()) or {})["paths"]["output_dir"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        output_dir = None
    parts = Path(output_dir).parts if isinstance(output_dir, str) else ()
    if parts and not Path(output_dir).is_absolute() and not {".", ".."} & set(parts):
        for i in range(len(root.parts) - len(parts), -1, -1):  # the deepest place it fits
            if root.parts[i : i + len(parts)] == parts:
                forms.add(Path(*root.parts[i:]).as_posix())
                break
    return sorted(forms - {"."}, key=len, reverse=True)


def run_dir_patterns(root: Path) -> list[re.Pattern]:
    """Where a config string names the run dir `root`: its absolute path anywhere (resolved, or as Hydra
    wrote it, `hydra.runtime.output_dir`, through any symlink), a relative form (`_relative_forms`) only at
    the start of the string (as a relative path is written)."""
    written = _hydra_runtime(root).get("output_dir")
    absolute = {root.as_posix(), *([written.rstrip("/")] if isinstance(written, str) and written else [])}
    patterns = [re.compile(rf"(?<![\w.~/-]){re.escape(a)}(?=/|$)") for a in sorted(absolute, key=len)[::-1]]
    patterns += [re.compile(rf"^(\./)?{re.escape(form)}(?=/|$)") for form in _relative_forms(root)]
    return patterns


def _without_run_dir(text: str, patterns: list[re.Pattern]) -> str:
    """`text` with the run dir's path replaced by a placeholder: a run's config names files inside its own
    run dir (quickstart data, trained models)."""
    for pattern in patterns:
        text = pattern.sub("<run_dir>", text)
    return text


def _without_seeds(value: Any, patterns: list[re.Pattern]) -> Any:
    """A config tree without its `seed` keys, with the run dir's path neutralised in every string."""
    if isinstance(value, dict):
        return {k: _without_seeds(v, patterns) for k, v in value.items() if k != SEED}
    if isinstance(value, list):
        return [_without_seeds(v, patterns) for v in value]
    return _without_run_dir(value, patterns) if isinstance(value, str) else value


def _recorded_config(run: Path) -> dict[str, Any]:
    """The run's resolved config (config.yaml) without paths, logger and hydra; without a config.yaml, its
    command-line overrides."""
    path = run / "config.yaml"
    if not path.is_file():
        return dict(run_overrides(run))
    config = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in config.items() if k not in NOT_A_POINT}


def _seeds(value: Any, where: str = "") -> list[tuple[str, Any]]:
    """Every `seed` key in a config tree (nested dicts, or the dotted keys of overrides) with its value."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            found += [(name, item)] if str(key).rsplit(".", 1)[-1] == SEED else _seeds(item, name)
    return found


def point_key(run: Path, root: Path) -> str:
    """What makes `run` a point of the comparison, the same for all its seeds: where it lies inside its
    outermost run (a quickstart's models/<name>) and its recorded config without the seeds, with the run
    dir's own path neutralised. A run without either record is a point of its own."""
    if not (run / "config.yaml").is_file() and not (run / ".hydra" / "overrides.yaml").is_file():
        return json.dumps(["no record", str(run)])
    config = _recorded_config(run)
    config = {k: v for k, v in config.items() if k.rsplit(".", 1)[-1] != SEED}  # overrides: dotted keys
    config = _without_seeds(config, run_dir_patterns(root))
    return json.dumps([run.relative_to(root).as_posix(), config], sort_keys=True)


def run_seed(run: Path) -> str:
    """The run's seeds (every `seed` key of its config), as one comparable text."""
    return json.dumps(sorted(_seeds(_recorded_config(run))), default=str)


def seed_groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows grouped by point (runs that differ only in their seeds), in the order of their first run."""
    roots = run_roots([r["run"] for r in rows])
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(point_key(row["run"], roots[row["run"]]), []).append(row)
    return list(groups.values())


def repeats(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a point whose seeds an earlier run of it already had (the same run made twice): not an
    independent sample, so left out of its mean and interval."""
    seen, again = set(), []
    for row in group:
        seed = run_seed(row["run"])
        if seed in seen:
            again.append(row)
        seen.add(seed)
    return again


def censoring(metrics: dict[str, Any], name: str) -> str | None:
    """The side of the bound that `metrics` says the value of `name` is: ">=" (flag `<name>_censored` = 1:
    a lower bound), "<=" (`<name>_left_censored` = 1: an upper bound), None (exact, or no flag)."""
    return next((side for suffix, side in CENSORING.items() if metrics.get(f"{name}{suffix}")), None)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def aggregate(
    groups: list[list[dict[str, Any]]], varying: list[str], names: list[str]
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """One row per point: its runs, its overrides but the seed, and per metric the mean, std and 95%
    interval of the mean over its seeds' finite values (null ones left out); the overrides that vary
    between points and the column names. A rate's own Wilson companions (`/n`, `/ci95_*`) are not
    averaged: the interval over seeds is the one reported. A metric with a censoring flag (`CENSORING`) gets
    `<metric>/n_censored`; where a seed's value is censored, the mean counts it at its bound and is a bound
    itself (`bounds`: ">=" or "<=" by column; censored both ways: no mean), without std or interval."""
    every = {m for g in groups for r in g for m in r["metrics"]}
    censorable = {m for m in every if any(f"{m}{suffix}" in every for suffix in CENSORING)}
    every = {m for m in every if not _companion(m, every)}
    names = [m for m in names if m in every]
    roots = run_roots([r["run"] for g in groups for r in g])
    points, short = [], set()
    for group in groups:
        first = group[0]["run"]
        metrics: dict[str, Any] = {"n_seeds": len(group)}
        bounds: dict[str, str] = {}
        for name in sorted(every, key=_natural):
            found = [
                (v, censoring(r["metrics"], name))
                for r in group
                if (v := _finite(r["metrics"].get(name))) is not None
            ]
            values = [v for v, _ in found]
            sides = {side for _, side in found if side is not None}
            stats = mean_ci95(values) if values else (math.nan,) * 4
            if sides:  # a bound, not a measurement: no spread, no interval; both ways: not even a bound
                stats = (stats[0] if len(sides) == 1 else math.nan, *(math.nan,) * 3)
                bounds[f"{name}/mean"] = sides.pop() if len(sides) == 1 else ""
            for key, value in zip(AGGREGATES, stats):
                metrics[f"{name}/{key}"] = _finite(value)
            metrics[f"{name}/n_seeds"] = len(values)
            if name in censorable:
                metrics[f"{name}/n_censored"] = sum(side is not None for _, side in found)
            if len(values) < len(group):
                short.add(name)
        overrides = {k: v for k, v in group[0]["overrides"].items() if k.rsplit(".", 1)[-1] != SEED}
        part = first.relative_to(roots[first]).as_posix()
        points.append(
            {
                "run": first,
                "runs": [r["run"] for r in group],
                "part": "" if part == "." else part,
                "overrides": overrides,
                "metrics": metrics,
                "bounds": bounds,
            }
        )
    varying = [k for k in varying if k.rsplit(".", 1)[-1] != SEED]
    varying = [k for k in varying if len({p["overrides"].get(k) for p in points}) > 1]
    columns = ["n_seeds"]
    for name in names:
        columns += [f"{name}/{key}" for key in AGGREGATES]
        columns += [f"{name}/n_seeds"] if name in short else []
        columns += [f"{name}/n_censored"] if name in censorable else []
    return points, varying, columns


def _companion(name: str, names) -> bool:
    """Whether `name` is the Wilson n or interval bound of another metric in `names`."""
    return any(name.endswith(w) and name[: -len(w)] in names for w in WILSON)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _label(row: dict[str, Any], varying: list[str], root: Path) -> str:
    """A row's name in a plot legend: its varying overrides (and, for a point, its place inside its run),
    else its run dir(s)."""
    words = [f"{k}={row['overrides'].get(k, '-')}" for k in varying]
    if "runs" in row:
        words += [row["part"]] if row["part"] else []
        return " ".join(words) or _runs_cell(row, root)
    return " ".join(words) or _relative(row["run"], root)


def _left_out_line(problem: tuple[Path, str], root: Path) -> str:
    """A markdown list line naming what was left out of the table and why, its paths relative to `root`."""
    where, why = problem
    name = _relative(where, root)
    why = why.replace(f"{where}/", "")  # the file, named inside its run
    return f"- {why}\n" if name == "." else f"- {name}: {why}\n"


def _runs_cell(row: dict[str, Any], root: Path) -> str:
    """The run dir of a run, or the run dirs of a point's seeds, relative to `root`."""
    return ", ".join(_relative(run, root) for run in row.get("runs", [row["run"]]))


def _relative(run: Path, root: Path) -> str:
    try:
        return str(run.relative_to(root.resolve())) or "."
    except ValueError:
        return str(run)


def tables(rows, varying, names, root: Path) -> tuple[str, str]:
    """The markdown and CSV text of the comparison table; a censored value (a run's, by its flag) or a mean
    over censored seeds (a point's `bounds`) as the bound it is: ">= 40", "<= 5"."""
    header = ["run", *varying, *names]
    lines = []
    for row in rows:
        values = [_runs_cell(row, root), *[row["overrides"].get(k, "") for k in varying]]
        for name in names:
            v = row["metrics"].get(name)
            text = "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
            side = row["bounds"].get(name) if "runs" in row else censoring(row["metrics"], name)
            values.append(f"{side} {text}" if side and text else text)
        lines.append(values)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(v) + " |" for v in lines]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(lines)
    return "\n".join(md) + "\n", buffer.getvalue()


def _point(row: dict[str, Any], metric: str) -> tuple[float | None, float | None, float | None]:
    """A row's value of `metric` and its 95% interval: over seeds for a point (mean, ci95), else the run's
    value with the Wilson bounds metrics.json records next to it (none for other metrics)."""
    values = row["metrics"]
    if "runs" in row:
        return tuple(values.get(f"{metric}/{key}") for key in ("mean", "ci95_low", "ci95_high"))
    return values.get(metric), values.get(f"{metric}/ci95_low"), values.get(f"{metric}/ci95_high")


def _metrics(row: dict[str, Any]) -> set[str]:
    """The metric names a row has values of (a point's aggregated ones by their base name)."""
    if "runs" in row:
        return {m.removesuffix("/mean") for m in row["metrics"] if m.endswith("/mean")}
    return {m for m in row["metrics"] if not _companion(m, row["metrics"])}


def _draw(ax, xs: list, points: list[tuple], **style) -> bool:
    """A line through the (x, (value, low, high)) points, with error bars from low to high where both are
    known; whether it drew any."""
    ys = [p[0] for p in points]
    if not any(p[1] is not None and p[2] is not None for p in points):
        ax.plot(xs, ys, **style)
        return False
    below = [math.nan if None in (y, low) else y - low for y, low, _ in points]
    above = [math.nan if None in (y, high) else high - y for y, _, high in points]
    ax.errorbar(xs, [math.nan if y is None else y for y in ys], yerr=[below, above], capsize=3, **style)
    return True


def _caption(ax, seeds: bool, bars: bool) -> None:
    """Say what the error bars are: over seeds (points), else over prompts (an ASR's Wilson interval)."""
    if seeds:
        ax.set_title("error bars: 95% interval of the mean over seeds", fontsize=8)
    elif bars:
        ax.set_title("error bars: 95% Wilson interval over prompts", fontsize=8)


def plots(rows, varying, out: Path, root: Path) -> list[Path]:
    """ASR vs each numeric swept override, ASR vs prefill depth, KL per position, with 95% intervals as
    error bars where known (over seeds, or an ASR's Wilson interval); the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = any("runs" in r for r in rows)
    written = []
    asr_keys = sorted({m for r in rows for m in _metrics(r) if m.startswith("asr/")}, key=_natural)
    for key in varying:
        xs = [_number(r["overrides"].get(key, "")) for r in rows]
        if not asr_keys or any(x is None for x in xs):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        others = [k for k in varying if k != key]
        groups: dict[str, list] = {}
        for x, r in zip(xs, rows):
            group = [f"{k}={r['overrides'].get(k)}" for k in others] + ([r["part"]] if r.get("part") else [])
            groups.setdefault(" ".join(group), []).append((x, r))
        bars = False
        for metric in asr_keys[:4]:
            for group, points in groups.items():
                points.sort(key=lambda p: p[0])
                bars |= _draw(
                    ax,
                    [p[0] for p in points],
                    [_point(p[1], metric) for p in points],
                    marker="o",
                    label=f"{metric} {group}".strip(),
                )
        ax.set_xlabel(key)
        ax.set_ylabel("attack success rate")
        _caption(ax, seeds, bars)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / f"asr_vs_{key.replace('.', '_')}.png"))
    depth = re.compile(r"^asr/prefill/k=(\d+)$")
    if any(depth.match(m) for r in rows for m in _metrics(r)):
        fig, ax = plt.subplots(figsize=(6, 4))
        bars = False
        for r in rows:
            ks = sorted(int(m.group(1)) for name in _metrics(r) if (m := depth.match(name)))
            bars |= _draw(
                ax,
                ks,
                [_point(r, f"asr/prefill/k={k}") for k in ks],
                marker="o",
                label=_label(r, varying, root),
            )
        ax.set_xlabel("prefilled harmful tokens")
        ax.set_ylabel("attack success rate")
        _caption(ax, seeds, bars)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "asr_vs_prefill_depth.png"))
    kl = re.compile(r"^kl/pos=(\d+)$")
    if any(kl.match(m) for r in rows for m in _metrics(r)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ks = sorted(int(m.group(1)) for name in _metrics(r) if (m := kl.match(name)))
            _draw(
                ax,
                ks,
                [_point(r, f"kl/pos={k}") for k in ks],
                marker="o",
                markersize=3,
                label=_label(r, varying, root),
            )
        ax.set_xlabel("response token position")
        ax.set_ylabel("KL (nats)")
        _caption(ax, seeds, False)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "kl_per_position.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepalign-compare", description=__doc__.split("\n")[0])
    parser.add_argument(
        "paths", nargs="+", type=Path, help="run dirs, or folders holding them (a multirun dir)"
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first path)")
    parser.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS), help="metric names or globs")
    args = parser.parse_args(argv)
    found = find_runs(args.paths)
    problems = {run: why for run in found if (why := run_problem(run)) is not None}
    unusable = sorted(
        [*problems.items(), *missing_runs(args.paths)], key=lambda p: (str(p[0]), _natural(p[1]))
    )
    for where, why in unusable:
        print(f"warning: {where}: {why}: left out", file=sys.stderr)
    runs = [run for run in found if run not in problems]
    if not runs:
        parser.error(f"no run with a readable, finished metrics.json under {', '.join(map(str, args.paths))}")
    out = args.out or args.paths[0]
    rows, varying, names = collect(runs, tuple(args.metrics))
    groups = seed_groups(rows)
    left_out = {r["run"] for group in groups for r in repeats(group)}
    groups = [[r for r in group if r["run"] not in left_out] for group in groups]
    if any(len(group) > 1 for group in groups):  # some point has several seeds: rows become points
        for run in sorted(left_out):
            print(f"warning: {run} repeats a seed of its point: left out", file=sys.stderr)
        rows, varying, names = aggregate(groups, varying, names)
    md, text = tables(rows, varying, names, args.paths[0])
    if unusable:
        md += "\nLeft out of the table:\n\n" + "".join(_left_out_line(p, args.paths[0]) for p in unusable)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(md)
    (out / "compare.csv").write_text(text)
    written = plots(rows, varying, out, args.paths[0])
    print(md)
    points = f" ({len(rows)} points over seeds)" if len(rows) < len(runs) else ""
    missing = f", {len(unusable)} left out (listed below the table)" if unusable else ""
    print(
        f"{len(runs)} runs{points}{missing}; wrote {out / 'compare.md'}, {out / 'compare.csv'}"
        + "".join(f", {p}" for p in written)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
