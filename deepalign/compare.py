"""`deepalign-compare`: a table (markdown + CSV) and plots across runs or a multirun sweep.

    deepalign-compare outputs/multirun/2026-11-28/12-57-24          # every run below it
    deepalign-compare RUN_DIR RUN_DIR ... --out compare/ --metrics 'asr/*' 'kl/pos=1' 'train/last_loss'

Rows are runs (a folder with a metrics.json), named by their command-line overrides (.hydra/overrides.yaml);
columns are the overrides that differ between runs, then the chosen metrics. Plots: ASR against each swept
numeric override (e.g. loss.beta.prefix), ASR against prefill depth, KL per position overlaid; an ASR with
its Wilson interval in metrics.json (`<asr>/ci95_low`, `<asr>/ci95_high`) gets it as an error bar.

Seeds (`deepalign -m ... seed=0,1,2`): runs whose resolved configs (config.yaml) are equal but for every
`seed` key, the paths, logger and hydra settings and the run dir's own path are one point. When some point
has several seeds, rows are points: `n_seeds`, then per metric `<metric>/mean`, `/std`, `/ci95_low`,
`/ci95_high` (the 95% interval of the mean over seeds, Student's t), and `<metric>/n_seeds` where a seed's
value is missing (null: non-finite) and left out; the plots draw the 95% intervals as error bars. A run
inside another (a quickstart's models/<name>) is a point of its own, never a seed of its parent or sibling.
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


def collect(runs: list[Path], patterns: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Rows (run, overrides, metrics), the overrides that vary between runs, and the matched metric names."""
    rows = []
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        rows.append({"run": run, "overrides": run_overrides(run), "metrics": metrics})
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


def _without_run_dir(text: str, root: Path) -> str:
    """`text` with the run dir's path (absolute, or any tail of it as a relative path) replaced by a
    placeholder: a run's config names files inside its own run dir (quickstart data, trained models)."""
    for i in range(len(root.parts)):
        form = Path(*root.parts[i:]).as_posix()
        pattern = re.compile(rf"(^|/){re.escape(form.lstrip('/'))}(?=/|$)")
        if pattern.search(text):
            return pattern.sub(r"\1<run_dir>", text)
    return text


def _without_seeds(value: Any, root: Path) -> Any:
    """A config tree without its `seed` keys, with the run dir's path neutralised in every string."""
    if isinstance(value, dict):
        return {k: _without_seeds(v, root) for k, v in value.items() if k != SEED}
    if isinstance(value, list):
        return [_without_seeds(v, root) for v in value]
    return _without_run_dir(value, root) if isinstance(value, str) else value


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
    return json.dumps([run.relative_to(root).as_posix(), _without_seeds(config, root)], sort_keys=True)


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
    averaged: the interval over seeds is the one reported."""
    every = {m for g in groups for r in g for m in r["metrics"]}
    every = {m for m in every if not _companion(m, every)}
    names = [m for m in names if m in every]
    roots = run_roots([r["run"] for g in groups for r in g])
    points, short = [], set()
    for group in groups:
        first = group[0]["run"]
        metrics: dict[str, Any] = {"n_seeds": len(group)}
        for name in sorted(every, key=_natural):
            values = [v for r in group if (v := _finite(r["metrics"].get(name))) is not None]
            stats = mean_ci95(values) if values else (math.nan,) * 4
            for key, value in zip(AGGREGATES, stats):
                metrics[f"{name}/{key}"] = _finite(value)
            metrics[f"{name}/n_seeds"] = len(values)
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
            }
        )
    varying = [k for k in varying if k.rsplit(".", 1)[-1] != SEED]
    varying = [k for k in varying if len({p["overrides"].get(k) for p in points}) > 1]
    columns = ["n_seeds"]
    for name in names:
        columns += [f"{name}/{key}" for key in AGGREGATES]
        columns += [f"{name}/n_seeds"] if name in short else []
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


def _runs_cell(row: dict[str, Any], root: Path) -> str:
    """The run dir of a run, or the run dirs of a point's seeds, relative to `root`."""
    return ", ".join(_relative(run, root) for run in row.get("runs", [row["run"]]))


def _relative(run: Path, root: Path) -> str:
    try:
        return str(run.relative_to(root.resolve())) or "."
    except ValueError:
        return str(run)


def tables(rows, varying, names, root: Path) -> tuple[str, str]:
    """The markdown and CSV text of the comparison table."""
    header = ["run", *varying, *names]
    lines = []
    for row in rows:
        values = [_runs_cell(row, root), *[row["overrides"].get(k, "") for k in varying]]
        for name in names:
            v = row["metrics"].get(name)
            values.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
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
    runs = find_runs(args.paths)
    if not runs:
        parser.error(f"no run with a metrics.json under {', '.join(map(str, args.paths))}")
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(md)
    (out / "compare.csv").write_text(text)
    written = plots(rows, varying, out, args.paths[0])
    print(md)
    points = f" ({len(rows)} points over seeds)" if len(rows) < len(runs) else ""
    print(
        f"{len(runs)} runs{points}; wrote {out / 'compare.md'}, {out / 'compare.csv'}"
        + "".join(f", {p}" for p in written)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
