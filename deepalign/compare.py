"""`deepalign-compare`: a table (markdown + CSV) and plots across runs or a multirun sweep.

    deepalign-compare outputs/multirun/2026-11-28/12-57-24          # every run below it
    deepalign-compare RUN_DIR RUN_DIR ... --out compare/ --metrics 'asr/*' 'kl/pos=1' 'train/last_loss'

Rows are runs (a folder with a metrics.json), named by their command-line overrides (.hydra/overrides.yaml);
columns are the overrides that differ between runs, then the chosen metrics. Plots: ASR against each swept
numeric override (e.g. loss.beta.prefix), ASR against prefill depth, KL per position overlaid.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import re
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRICS = ("asr/*", "kl/pos=1", "kl/pos=5", "kl/pos=10", "utility/*", "train/last_loss")


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


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _label(row: dict[str, Any], varying: list[str], root: Path) -> str:
    if varying:
        return " ".join(f"{k}={row['overrides'].get(k, '-')}" for k in varying)
    return _relative(row["run"], root)


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
        values = [_relative(row["run"], root), *[row["overrides"].get(k, "") for k in varying]]
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


def plots(rows, varying, out: Path, root: Path) -> list[Path]:
    """ASR vs each numeric swept override, ASR vs prefill depth, KL per position; the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    asr_keys = sorted({m for r in rows for m in r["metrics"] if m.startswith("asr/")}, key=_natural)
    for key in varying:
        xs = [_number(r["overrides"].get(key, "")) for r in rows]
        if not asr_keys or any(x is None for x in xs):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        others = [k for k in varying if k != key]
        groups: dict[str, list] = {}
        for x, r in zip(xs, rows):
            groups.setdefault(" ".join(f"{k}={r['overrides'].get(k)}" for k in others), []).append((x, r))
        for metric in asr_keys[:4]:
            for group, points in groups.items():
                points.sort(key=lambda p: p[0])
                ax.plot(
                    [p[0] for p in points],
                    [p[1]["metrics"].get(metric) for p in points],
                    marker="o",
                    label=f"{metric} {group}".strip(),
                )
        ax.set_xlabel(key)
        ax.set_ylabel("attack success rate")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / f"asr_vs_{key.replace('.', '_')}.png"))
    depth = re.compile(r"^asr/prefill/k=(\d+)$")
    if any(depth.match(m) for r in rows for m in r["metrics"]):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            points = sorted(
                (int(depth.match(m).group(1)), v) for m, v in r["metrics"].items() if depth.match(m)
            )
            ax.plot(
                [p[0] for p in points], [p[1] for p in points], marker="o", label=_label(r, varying, root)
            )
        ax.set_xlabel("prefilled harmful tokens")
        ax.set_ylabel("attack success rate")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "asr_vs_prefill_depth.png"))
    kl = re.compile(r"^kl/pos=(\d+)$")
    if any(kl.match(m) for r in rows for m in r["metrics"]):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            points = sorted((int(kl.match(m).group(1)), v) for m, v in r["metrics"].items() if kl.match(m))
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                markersize=3,
                label=_label(r, varying, root),
            )
        ax.set_xlabel("response token position")
        ax.set_ylabel("KL (nats)")
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
    md, text = tables(rows, varying, names, args.paths[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(md)
    (out / "compare.csv").write_text(text)
    written = plots(rows, varying, out, args.paths[0])
    print(md)
    print(
        f"{len(runs)} runs; wrote {out / 'compare.md'}, {out / 'compare.csv'}"
        + "".join(f", {p}" for p in written)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
