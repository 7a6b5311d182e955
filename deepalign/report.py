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


def asr_columns(metrics: dict[str, float], models, prefix: str = "asr") -> list[str]:
    """The `<prefix>/<variant>` keys any model has (not the single decoding settings), in table order."""
    keys = {
        k.split("/", 1)[1]
        for k in metrics
        if k.split("/", 1)[0] in models and k.split("/", 1)[-1].startswith(f"{prefix}/")
    }
    keys = {k for k in keys if not k.startswith(f"{prefix}/decoding/")}

    def order(key: str) -> tuple[int, int]:
        variant = key.removeprefix(f"{prefix}/")
        depth = PREFILL.match(f"asr/{variant}")
        rank = {"none": 0, "decoding": 2, "gcg": 3}.get(variant, 1)
        return rank, int(depth.group(1)) if depth else 0

    return sorted(keys, key=order)


def table(metrics: dict[str, float], models, columns: list[str], names: list[str] | None = None) -> list[str]:
    """A markdown table: one row per model, one column per metric key (shares as percentages)."""
    names = names or columns
    lines = ["| " + " | ".join(["model", *names]) + " |", "|" + "---|" * (len(names) + 1)]
    for model in models:
        cells = [_fmt(metrics.get(f"{model}/{c}"), c.startswith(("asr", "utility/"))) for c in columns]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return lines


STAGE_ORDER = ("train", "attack", "analyze", "utility", "probe")
TimeRow = tuple[str, str, float | None, float | None, float | None]


def time_rows(metrics: dict[str, float], models) -> list[TimeRow]:
    """Where the time goes: (part, stage, seconds, generation tokens/s, training tokens/s) for the harvest,
    each sub-run's stages (`<model>/time/<stage>_s`, `<model>/throughput/<stage>/gen_tokens_per_s` and
    `.../tokens_per_s`) and the margins."""
    get = metrics.get
    rows: list[TimeRow] = [
        (
            "harvest",
            "generate",
            get("time/quickstart/harvest_s"),
            get("throughput/harvest/gen_tokens_per_s"),
            None,
        )
    ]
    for model in models:
        prefix = f"{model}/time/"
        stages = [k[len(prefix) : -2] for k in metrics if k.startswith(prefix) and k.endswith("_s")]
        stages.sort(key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
        for stage in stages:
            speed = f"{model}/throughput/{stage}"
            rows.append(
                (
                    model,
                    stage,
                    get(prefix + f"{stage}_s"),
                    get(f"{speed}/gen_tokens_per_s"),
                    get(f"{speed}/tokens_per_s"),
                )
            )
    rows.append(("margins", "first-token margin", get("time/quickstart/margin_s"), None, None))
    return rows


def time_table(metrics: dict[str, float], models) -> list[str]:
    """The "where the time goes" markdown table, with a total row."""

    def cell(value: float | None, digits: str) -> str:
        return "-" if value is None else format(value, digits)

    rows = time_rows(metrics, models)
    lines = ["| part | stage | seconds | generation tokens/s | training tokens/s |", "|---|---|---|---|---|"]
    for part, stage, seconds, gen, train in rows:
        cells = [part, stage, cell(seconds, ".0f"), cell(gen, ".1f"), cell(train, ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r[2] for r in rows if r[2] is not None)
    lines.append(f"| total | | {total:.0f} ({total / 60:.1f} min) | | |")
    return lines


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
    """report.md with the tables and plots; the plots also go to the tracker."""
    columns = asr_columns(metrics, models)
    asr_names = [c.removeprefix("asr/") for c in columns]
    main = table(metrics, models, columns, asr_names)
    substantive = asr_columns(metrics, models, "asr_keyword_substantive")
    model_rows = table(
        metrics,
        models,
        [
            "utility/benign/over_refusal",
            "margin/first_token",
            "train/first_nll",
            "train/last_nll",
            "train/steps",
        ],
        ["over-refusal", "first-token margin (nats)", "train NLL first", "train NLL last", "steps"],
    )
    for i, model in enumerate(models):
        seconds = metrics.get(f"time/quickstart/{model}_s")
        model_rows[i + 2] += f" {'-' if seconds is None else f'{seconds:.0f}'} |"
    model_rows[0] += " time (s) |"
    model_rows[1] += "---|"
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
    times = {k.split("/")[-1][:-2]: v for k, v in metrics.items() if k.startswith("time/quickstart/")}
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    text = [
        "# deepalign quickstart report",
        "",
        "Attack success rate (ASR): share of the evaluation prompts whose answer the keyword judge (qi2024",
        "refusal phrases) counts as harmful. pf k = k harmful tokens prefilled; decoding = broken by any",
        "sampling setting; gcg = on the prompts searched (fewer).",
        "",
        *main,
    ]
    if substantive:
        text += [
            "",
            "The same answers, judged with the `keyword_substantive` rule (an answer without a refusal",
            "phrase counts only if it adds enough text after the prefill; finishing the prefilled sentence",
            "is not harmful):",
            "",
            *table(metrics, models, substantive, [c.split("/", 1)[1] for c in substantive]),
        ]
    text += [
        "",
        "Over-refusal on benign prompts; first-token margin = mean log P(refusal start) - log p(harmful",
        "start) at the first response token; NLL per target token of the model's own training batches",
        "(fine-tuning attacks: the harmful data, whatever the loss optimised).",
        "",
        *model_rows,
        "",
        f"Stage times: {timings}; total {sum(times.values()) / 60:.1f} min.",
        "",
        "Where the time goes: each part's stages, with the tokens generated per second (new tokens) and",
        "trained per second (non-padding input tokens) where the stage generated or trained in this run.",
        "",
        *time_table(metrics, models),
        "",
    ]
    text += [f"![{name}]({name})" for name in images]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(text) + "\n")
    for name in images:
        tracker.log({f"report/{name[:-4]}": tracker.image(run_dir / name)})
    return path
