"""The quickstart report: a table (model x attack ASR, utility, training, time) and two plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

from deepalign.kl import PositionStats, plot_per_position
from deepalign.rundir import write_text_atomic

PREFILL = re.compile(r"^asr/prefill/k=(\d+)$")


def _fmt(value, share: bool) -> str:
    """Shares (ASR, over-refusal) as percentages, other numbers with 3 significant digits."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if share else f"{value:.3g}"


def asr_columns(metrics: dict[str, float], models) -> list[str]:
    keys = {
        k.split("/", 1)[1]
        for k in metrics
        if k.split("/", 1)[0] in models and "/asr/" in f"/{k.split('/', 1)[1]}"
    }
    keys = {k for k in keys if k.startswith("asr/") and not k.startswith("asr/decoding/")}
    order = {"asr/none": 0, "asr/decoding": 2, "asr/gcg": 3}
    return sorted(
        keys, key=lambda k: (order.get(k, 1), int(PREFILL.match(k).group(1)) if PREFILL.match(k) else 0)
    )


def plot_asr_vs_depth(metrics: dict[str, float], models, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for model in models:
        points = [(0, metrics.get(f"{model}/asr/none"))]
        points += sorted(
            (int(m.group(1)), v)
            for k, v in metrics.items()
            if k.startswith(f"{model}/") and (m := PREFILL.match(k.split("/", 1)[1]))
        )
        points = [(x, y) for x, y in points if y is not None]
        if len(points) > 1:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=model)
            drawn = True
    ax.set_xlabel("prefilled harmful tokens (0 = no attack)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def write_report(run_dir: Path, metrics: dict[str, float], models, tracker) -> Path:
    """report.md with the table and plots; the plots also go to the tracker."""
    columns = asr_columns(metrics, models)
    extra = ["utility/benign/over_refusal", "train/first_loss", "train/last_loss"]
    header = ["model", *columns, *extra, "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        cells = [
            _fmt(metrics.get(f"{model}/{c}"), c.startswith(("asr/", "utility/"))) for c in columns + extra
        ]
        seconds = metrics.get(f"time/quickstart/{model}_s")
        lines.append("| " + " | ".join([model, *cells, "-" if seconds is None else f"{seconds:.0f}"]) + " |")
    curves = {}
    for model in models:
        path = run_dir / "models" / model / "analysis" / "kl.json"
        if path.is_file():
            data = json.loads(path.read_text())
            curves[f"{model} || unaligned"] = PositionStats(data["mean"], data["std"], data["count"])
    images = []
    if curves:
        plot_per_position(curves, run_dir / "kl_per_position.png", "Per-token KL to the unaligned model")
        images.append("kl_per_position.png")
    if plot_asr_vs_depth(metrics, models, run_dir / "asr_vs_prefill_depth.png"):
        images.append("asr_vs_prefill_depth.png")
    total = sum(v for k, v in metrics.items() if k.startswith("time/quickstart/"))
    timings = ", ".join(
        f"{k.split('/')[-1][:-2]} {v:.0f} s" for k, v in metrics.items() if k.startswith("time/quickstart/")
    )
    text = [
        "# deepalign quickstart report",
        "",
        "ASR = share of evaluation prompts whose answer the keyword judge (qi2024 list) counts as harmful.",
        "",
        *lines,
        "",
        f"Stage times: {timings}; total {total / 60:.1f} min.",
        "",
    ]
    text += [f"![{name}]({name})" for name in images]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(text) + "\n")
    for name in images:
        tracker.log({f"report/{name[:-4]}": tracker.image(run_dir / name)})
    return path
