"""Where a quickstart run's time went, from its metrics.json (nothing is rerun).

    python bench/quickstart_stages.py RUN_DIR                # e.g. the run dir of `make quickstart`
    python bench/quickstart_stages.py RUN_DIR --budget-min 15

The quickstart records `time/quickstart/<part>_s` per part (the harvest, each model's sub-run, the first-token
margins) and each sub-run its own stage times as `<model>/time/<stage>_s`, both taken when the work really ran
(a rerun that skips finished stages keeps the first times). The table has one row per part, its stage times
as columns, and its share of the total. A second table gives the tokens generated and trained per second of
each stage that generated or trained (`throughput/...` keys, as in the run's report.md) and the process's RSS
high-water mark when the stage ended (`memory/...`). A third gives each stage's useful work (`flops/...`:
2 x params per token forward, 6 x per token trained) per second against this machine's matmul rate
(`machine/<dtype>_gflops`): the run's efficiency, the figure to push up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402

from deepalign.report import efficiency_table, time_rows  # noqa: E402

PART_PREFIX = "time/quickstart/"
PART_ORDER = ["harvest", "unaligned", "shallow", "deep", "ft_sft", "ft_constrained", "ft_constrained_paper"]


def stage_table(metrics: dict[str, float]) -> tuple[list[str], list[list[str]], float]:
    """Header, rows (one per part, in the run's order, then the total) and the total seconds."""
    parts = {k[len(PART_PREFIX) : -2]: float(v) for k, v in metrics.items() if k.startswith(PART_PREFIX)}
    if not parts:
        raise SystemExit(f"no {PART_PREFIX}*_s keys: not a quickstart run's metrics.json")
    rank = {p: i for i, p in enumerate(PART_ORDER)}  # the run's order; unknown parts next, margin last
    parts = dict(sorted(parts.items(), key=lambda kv: (kv[0] == "margin", rank.get(kv[0], len(rank)))))
    stages: list[str] = []
    for key in metrics:
        model, _, rest = key.partition("/time/")
        if rest.endswith("_s") and model in parts and rest[:-2] not in stages:
            stages.append(rest[:-2])
    order = ["train", "attack", "analyze", "utility", "probe"]
    stages.sort(key=lambda s: order.index(s) if s in order else len(order))
    total = sum(parts.values())
    rows = []
    for part, seconds in parts.items():
        cells = []
        for stage in stages:
            value = metrics.get(f"{part}/time/{stage}_s")
            cells.append("" if value is None else f"{float(value):.0f}")
        rows.append([part, *cells, f"{seconds:.0f}", f"{100 * seconds / total:.0f}%"])
    sums = [f"{sum(float(metrics.get(f'{p}/time/{s}_s', 0.0)) for p in parts):.0f}" for s in stages]
    rows.append(["**total**", *sums, f"**{total:.0f}** ({total / 60:.1f} min)", "100%"])
    return ["part", *[f"{s} (s)" for s in stages], "total (s)", "share"], rows, total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a quickstart run dir (holding metrics.json)")
    parser.add_argument("--budget-min", type=float, default=15.0, help="the time budget to compare with")
    args = parser.parse_args()
    path = args.run_dir / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    metrics = json.loads(path.read_text())
    header, rows, total = stage_table(metrics)
    print(f"{path}\n")
    print(markdown_table(header, rows))
    verdict = "met" if total <= args.budget_min * 60 else "MISSED"
    print(f"\nTotal {total / 60:.1f} min against a budget of {args.budget_min:g} min: {verdict}.")
    speeds = [
        [
            part,
            stage,
            f"{seconds:.0f}",
            "-" if gen is None else f"{gen:.1f}",
            "-" if train is None else f"{train:.0f}",
            memory or "-",
        ]
        for part, stage, seconds, gen, train, memory in time_rows(metrics, PART_ORDER[1:])
        if seconds is not None and (gen is not None or train is not None)
    ]
    if speeds:
        print(
            "\n"
            + markdown_table(
                [
                    "part",
                    "stage",
                    "seconds",
                    "generation tokens/s",
                    "training tokens/s",
                    "RSS high-water (GiB)",
                ],
                speeds,
            )
        )
    work = efficiency_table(metrics, PART_ORDER[1:])
    if work:
        print(
            "\nUseful work (2 x params x tokens forward, 6 x params x tokens trained) against the machine:\n"
        )
        print("\n".join(work))


if __name__ == "__main__":
    main()
