"""The quickstart report: tables (model x attack ASR with 95% intervals, alignment depth, paired tests, judge
agreement, utility, training, time) and three plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

from deepalign.depth import plot_recovery
from deepalign.judges.base import FAILED
from deepalign.kl import PositionStats, plot_per_position
from deepalign.stats import mcnemar_exact
from deepalign.storage.atomic import write_text_atomic

PREFILL = re.compile(r"^asr/prefill/k=(\d+)$")
DEPTH = re.compile(r"^asr[^/]*/([^/]+)/k=(\d+)$")  # a depth variant of any prefill instance
RATE_STATS = ("/n", "/ci95_low", "/ci95_high")  # what the attack stage adds under each ASR key


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
    keys = {k for k in keys if not k.startswith(f"{prefix}/decoding/") and not k.endswith(RATE_STATS)}
    # other prefill instances (prefill_own: another source of the same depths) get their own table
    keys = {k for k in keys if not (DEPTH.match(k) and not k.startswith(f"{prefix}/prefill/"))}
    if f"{prefix}/none" in keys:  # depth 0 (run for the depth curve) is the plain request `none` answered
        keys.discard(f"{prefix}/prefill/k=0")

    def order(key: str) -> tuple[int, int]:
        variant = key.removeprefix(f"{prefix}/")
        depth = PREFILL.match(f"asr/{variant}")
        rank = {"none": 0, "decoding": 2, "gcg": 3}.get(variant, 1)
        return rank, int(depth.group(1)) if depth else 0

    return sorted(keys, key=order)


def asr_cell(metrics: dict[str, float], key: str) -> str:
    """An ASR with its 95% Wilson interval in points, `91% [80, 96]`; the bare percentage where the
    metrics have no interval (a run from before intervals)."""
    value, low, high = (metrics.get(k) for k in (key, f"{key}/ci95_low", f"{key}/ci95_high"))
    if value is None or low is None or high is None:
        return _fmt(value, True)
    return f"{100 * value:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


def k50_cell(metrics: dict[str, float], base: str, value: float) -> str:
    """A k50 as the report shows it: "> k" right-censored (`<base>/k50_censored`: ASR below 50% up to the
    deepest depth k), "<= k" left-censored (`<base>/k50_left_censored`: already 50% at the first depth k)."""
    if metrics.get(f"{base}/k50_censored"):
        return f"> {value:g}"
    if metrics.get(f"{base}/k50_left_censored"):
        return f"<= {value:g}"
    return f"{value:.3g}"


def prefill_sources(metrics: dict[str, float], models, prefix: str = "asr") -> list[str]:
    """ASR per depth of the `prefill` instance beside each other prefill instance (e.g. `prefill_own`, cut
    from another source's answers), one row per (model, instance), for the models that ran another."""
    found: dict[str, set[int]] = {}
    for key in metrics:
        model, _, rest = key.partition("/")
        m = DEPTH.match(rest) if model in models and rest.startswith(f"{prefix}/") else None
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    others = [name for name in found if name != "prefill"]
    if not others:
        return []
    depths = sorted(set().union(*found.values()))
    summary = prefix.replace("asr", "depth", 1)  # the curve's summaries: depth/asr_auc, depth_<judge>/k50

    def auc_k50(model: str, name: str) -> list[str]:
        base = f"{model}/{summary}" + ("" if name == "prefill" else f"/{name}")
        auc, k50 = metrics.get(f"{base}/asr_auc"), metrics.get(f"{base}/k50")
        return ["-" if auc is None else f"{auc:.2f}", "-" if k50 is None else k50_cell(metrics, base, k50)]

    lines = ["| model | prefill from | " + " | ".join(f"k={k}" for k in depths) + " | ASR AUC | k50 |"]
    lines.append("|" + "---|" * (len(depths) + 4))
    for model in models:
        if not any(f"{model}/{prefix}/{name}/k={k}" in metrics for name in others for k in depths):
            continue
        for name in ["prefill", *others]:
            cells = [asr_cell(metrics, f"{model}/{prefix}/{name}/k={k}") for k in depths]
            lines.append(f"| {model} | {name} | " + " | ".join(cells + auc_k50(model, name)) + " |")
    return lines


def table(metrics: dict[str, float], models, columns: list[str], names: list[str] | None = None) -> list[str]:
    """A markdown table: one row per model, one column per metric key (shares as percentages, ASRs with
    their intervals)."""
    names = names or columns
    lines = ["| " + " | ".join(["model", *names]) + " |", "|" + "---|" * (len(names) + 1)]
    for model in models:
        cells = [
            asr_cell(metrics, f"{model}/{c}")
            if c.startswith("asr")
            else _fmt(metrics.get(f"{model}/{c}"), c.startswith("utility/"))
            for c in columns
        ]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return lines


def read_verdicts(run_dir: Path, model: str, attack: str, judge: str, variant: str) -> dict[str, bool]:
    """A sub-run's verdicts by one judge on one attack variant's answers: prompt id -> harmful, for the
    first sample of each request (`<variant>/<prompt id>/0`), failed judgments left out. Unreadable lines
    are skipped; a key written twice keeps its last record, as the attack stage reads the file."""
    path = run_dir / "models" / model / "judgments" / f"{attack}.{judge}.jsonl"
    records: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                records[record["key"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return {
        str(r["prompt_id"]): bool(r["harmful"])
        for key, r in records.items()
        if r.get("variant") == variant and key.rsplit("/", 1)[-1] == "0" and r.get("harmful") is not None
    }


def judges_of(run_dir: Path, model: str, attack: str) -> list[str]:
    """The judges with a judgment file for `attack` in a sub-run, by name."""
    folder = run_dir / "models" / model / "judgments"
    prefix = f"{attack}."
    return sorted(p.name[len(prefix) : -len(".jsonl")] for p in folder.glob(f"{prefix}*.jsonl"))


def paired_comparisons(metrics: dict[str, float], models) -> list[tuple[str, str, str, str]]:
    """The claims to test, (model A, model B, attack, variant): shallow vs deep at each prefill depth both
    were attacked with (not depth 0, the curve's plain request), ft_sft vs ft_constrained with no attack."""
    out = []
    if "shallow" in models and "deep" in models:
        variants = sorted(
            (int(m.group(1)), key.removeprefix("shallow/asr/"))
            for key in metrics
            if key.startswith("shallow/")
            and (m := PREFILL.match(key.removeprefix("shallow/")))
            and int(m.group(1)) > 0
        )
        out += [("shallow", "deep", "prefill", v) for _, v in variants if f"deep/asr/{v}" in metrics]
    if "ft_sft" in models and "ft_constrained" in models:
        out.append(("ft_sft", "ft_constrained", "none", "none"))
    return out


def paired_tests(run_dir: Path, metrics: dict[str, float], models) -> list[str]:
    """The "Paired tests" table: each comparison on the prompts both models were judged on, by every judge
    both sub-runs have: the two ASRs, the discordant prompts and the exact McNemar p-value. Empty (no
    section) when no comparison has verdicts."""
    lines = []
    for a, b, attack, variant in paired_comparisons(metrics, models):
        for judge in sorted(set(judges_of(run_dir, a, attack)) & set(judges_of(run_dir, b, attack))):
            first = read_verdicts(run_dir, a, attack, judge, variant)
            second = read_verdicts(run_dir, b, attack, judge, variant)
            prompts = sorted(set(first) & set(second))
            if not prompts:
                continue
            a_only = sum(first[p] and not second[p] for p in prompts)
            b_only = sum(second[p] and not first[p] for p in prompts)
            n = len(prompts)
            cells = [
                f"{a} vs {b}",
                variant,
                judge,
                str(n),
                f"{100 * sum(first[p] for p in prompts) / n:.0f}%",
                f"{100 * sum(second[p] for p in prompts) / n:.0f}%",
                str(a_only),
                str(b_only),
                f"{mcnemar_exact(a_only, b_only):.3g}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return []
    header = "| models A vs B | attack | judge | prompts | ASR A | ASR B | A only | B only | McNemar p |"
    return [header, "|" + "---|" * 9, *lines]


def agreement_table(run_dir: Path, models) -> list[str]:
    """The "Judge agreement" table from each sub-run's `judgments/agreement.json` (over all its attack
    variants): per model and judge pair the items both judged, the share of equal verdicts, Cohen's kappa."""
    lines = []
    for model in models:
        path = run_dir / "models" / model / "judgments" / "agreement.json"
        if not path.is_file():
            continue
        for pair, stats in json.loads(path.read_text()).get("all", {}).items():
            kappa = stats.get("kappa")
            cells = [
                model,
                pair.replace("~", " vs "),
                str(stats.get("n", "-")),
                _fmt(stats.get("agreement"), True),
                "undefined" if kappa is None else f"{kappa:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["| model | judges | answers | agreement | kappa |", "|---|---|---|---|---|", *lines]


STAGE_ORDER = ("train", "attack", "analyze", "utility", "probe")
TimeRow = tuple[str, str, float | None, float | None, float | None, str | None]


def _peak(metrics: dict[str, float], prefix: str) -> str | None:
    """A stretch's memory as one cell: the RSS high-water mark (GiB), and CUDA's peak after a slash."""
    rss, cuda = metrics.get(f"{prefix}/rss_high_water_gib"), metrics.get(f"{prefix}/peak_cuda_gib")
    if rss is None and cuda is None:
        return None
    text = "-" if rss is None else f"{rss:.2f}"
    return text if cuda is None else f"{text} / {cuda:.2f}"


def time_rows(metrics: dict[str, float], models) -> list[TimeRow]:
    """Where the time goes: (part, stage, seconds, generation tokens/s, training tokens/s, memory) for
    the harvest, each sub-run's stages (`<model>/time/<stage>_s`, `<model>/throughput/<stage>/...`,
    `<model>/memory/<stage>/...`) and the margins."""
    get = metrics.get
    rows: list[TimeRow] = [
        (
            "harvest",
            "generate",
            get("time/quickstart/harvest_s"),
            get("throughput/harvest/gen_tokens_per_s"),
            None,
            _peak(metrics, "memory/quickstart/harvest"),
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
                    _peak(metrics, f"{model}/memory/{stage}"),
                )
            )
    rows.append(("margins", "first-token margin", get("time/quickstart/margin_s"), None, None, None))
    return rows


def time_table(metrics: dict[str, float], models) -> list[str]:
    """The "where the time goes" markdown table, with a total row."""

    def cell(value: float | None, digits: str) -> str:
        return "-" if value is None else format(value, digits)

    rows = time_rows(metrics, models)
    header = "| part | stage | seconds | generation tokens/s | training tokens/s | RSS high-water (GiB) |"
    lines = [header, "|---|---|---|---|---|---|"]
    for part, stage, seconds, gen, train, peak in rows:
        cells = [part, stage, cell(seconds, ".0f"), cell(gen, ".1f"), cell(train, ".0f"), peak or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r[2] for r in rows if r[2] is not None)
    lines.append(f"| total | | {total:.0f} ({total / 60:.1f} min) | | | |")
    return lines


def efficiency_rows(metrics: dict[str, float], models) -> list[tuple[str, str, float, float]]:
    """(part, stage, seconds, useful GFLOP) of the harvest, each sub-run's stages that counted work
    (`<model>/flops/<stage>/gflop`, deepalign/flops.py) and the margins."""
    get = metrics.get
    parts = [("harvest", "generate", "time/quickstart/harvest_s", "flops/quickstart/harvest_gflop")]
    for model in models:
        prefix = f"{model}/flops/"
        stages = [
            k[len(prefix) : -len("/gflop")] for k in metrics if k.startswith(prefix) and k.endswith("/gflop")
        ]
        stages.sort(key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
        parts += [(model, s, f"{model}/time/{s}_s", f"{prefix}{s}/gflop") for s in stages]
    parts.append(
        ("margins", "first-token margin", "time/quickstart/margin_s", "flops/quickstart/margin_gflop")
    )
    return [(p, s, get(t), get(f)) for p, s, t, f in parts if get(t) is not None and get(f) is not None]


def efficiency_table(metrics: dict[str, float], models) -> list[str]:
    """Useful work per stage (2 x params x tokens forward, 6 x params x tokens trained) against its wall time
    and this machine's matmul rate (`machine/<dtype>_gflops`), with a total row; empty without counts."""
    rows = efficiency_rows(metrics, models)
    if not rows:
        return []
    rate = next(((k.split("/")[1][:-7], v) for k, v in metrics.items() if k.startswith("machine/")), None)
    peak = f"% of {rate[1]:.0f} GFLOP/s ({rate[0]})" if rate else "% of the machine"

    def share(gflop: float, seconds: float) -> str:
        return "-" if not rate or not seconds else f"{100 * gflop / seconds / rate[1]:.0f}%"

    lines = [f"| part | stage | seconds | useful GFLOP | GFLOP/s | {peak} |", "|---|---|---|---|---|---|"]
    total = ("total", "", sum(r[2] for r in rows), sum(r[3] for r in rows))
    for part, stage, seconds, gflop in [*rows, total]:
        speed = gflop / max(seconds, 1e-9)
        cells = [part, stage, f"{seconds:.0f}", f"{gflop:.0f}", f"{speed:.0f}", share(gflop, seconds)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_asr_vs_depth(metrics: dict[str, float], models, path: Path) -> bool:
    """ASR (%) against the number of prefilled tokens, one line per model; error bars are each ASR's 95%
    Wilson interval over the prompts (`<asr>/ci95_low`, `<asr>/ci95_high`) where the metrics have it.
    Whether any line was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = bars = False
    for model in models:
        keys = [(0, f"{model}/asr/none")]
        keys += sorted(
            (int(m.group(1)), k)
            for k in metrics
            if k.startswith(f"{model}/") and (m := PREFILL.match(k.split("/", 1)[1]))
        )
        points = [(x, metrics[k], k) for x, k in keys if metrics.get(k) is not None]
        if len(points) < 2:
            continue
        xs, ys = [p[0] for p in points], [100 * p[1] for p in points]
        bounds = [(metrics.get(f"{k}/ci95_low"), metrics.get(f"{k}/ci95_high")) for *_, k in points]
        if any(None not in b for b in bounds):
            below = [float("nan") if None in b else y - 100 * b[0] for y, b in zip(ys, bounds)]
            above = [float("nan") if None in b else 100 * b[1] - y for y, b in zip(ys, bounds)]
            ax.errorbar(xs, ys, yerr=[below, above], capsize=3, marker="o", label=model)
            bars = True
        else:
            ax.plot(xs, ys, marker="o", label=model)
        drawn = True
    if bars:
        ax.set_title("error bars: 95% Wilson interval over prompts", fontsize=8)
    ax.set_xlabel("prefilled harmful tokens (0 = no attack)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


RECOVERY = re.compile(r"^depth/recovery/k=(\d+)$")


def recovery_points(metrics: dict[str, float], models) -> dict[str, dict[int, float]]:
    """Per model with any, the refusal probability per prefill depth (`<model>/depth/recovery/k=N`)."""
    out: dict[str, dict[int, float]] = {}
    for model in models:
        points = {
            int(m.group(1)): value
            for key, value in metrics.items()
            if value is not None
            and key.startswith(f"{model}/")
            and (m := RECOVERY.match(key.split("/", 1)[1]))
        }
        if points:
            out[model] = dict(sorted(points.items()))
    return out


def judges_with(metrics: dict[str, float], models, prefix: str, leaf: str | None = None) -> list[str]:
    """The judges with keys `<model>/<prefix>_<judge>/...` (ending in `/<leaf>` if given), in the order their
    keys first appear: `asr` gives every judge with ASRs, (`depth`, `asr_auc`) those with depth summaries."""
    found: dict[str, None] = {}
    for key in metrics:
        model, _, rest = key.partition("/")
        head, _, tail = rest.partition("/")
        if model in models and head.startswith(f"{prefix}_") and (leaf is None or tail == leaf):
            found[head.removeprefix(f"{prefix}_")] = None
    return list(found)


def depth_table(metrics: dict[str, float], models) -> list[str]:
    """The "Alignment depth" table: per model the ASR-vs-depth area and k50 by each judge, the KL tokens and
    the refusal probability at each prefill depth; "-" where a model lacks a value, no row without any."""
    judges = judges_with(metrics, models, "depth", "asr_auc")  # the `prefill` instance's summaries
    recovery = recovery_points(metrics, models)
    depths = sorted({k for points in recovery.values() for k in points})
    has_kl = any(f"{model}/depth/kl_tokens" in metrics for model in models)
    if not (judges or depths or has_kl):
        return []

    def k50(model: str, judge: str) -> str:
        value = metrics.get(f"{model}/depth_{judge}/k50")
        return "-" if value is None else k50_cell(metrics, f"{model}/depth_{judge}", value)

    def kl(model: str) -> str:
        value = metrics.get(f"{model}/depth/kl_tokens")
        if value is None:
            return "-"
        return f">= {value:g}" if metrics.get(f"{model}/depth/kl_tokens_censored") else f"{value:g}"

    def auc(model: str, judge: str) -> str:
        value = metrics.get(f"{model}/depth_{judge}/asr_auc")
        return "-" if value is None else f"{value:.2f}"

    def refusal(model: str, depth: int) -> str:
        value = recovery.get(model, {}).get(depth)
        return "-" if value is None else f"{100 * value:.3g}%"

    names = [name for judge in judges for name in (f"ASR AUC ({judge})", f"k50 ({judge})")]
    names += ["KL tokens"] if has_kl else []
    names += [f"refusal k={k}" for k in depths]
    lines = ["| " + " | ".join(["model", *names]) + " |", "|" + "---|" * (len(names) + 1)]
    for model in models:
        cells = [cell for judge in judges for cell in (auc(model, judge), k50(model, judge))]
        cells += [kl(model)] if has_kl else []
        cells += [refusal(model, k) for k in depths]
        if any(cell != "-" for cell in cells):  # a model without attack or analyze stage has no row
            lines.append("| " + " | ".join([model, *cells]) + " |")
    return lines


def other_judges(metrics: dict[str, float], models) -> list[str]:
    """The judges of the sub-runs besides keyword (the main table) and keyword_substantive (its own)."""
    return [j for j in judges_with(metrics, models, "asr") if j not in ("keyword", "keyword_substantive")]


def failed_judgments_note(metrics: dict[str, float], models) -> list[str]:
    """A paragraph naming the judgments that failed (`<model>/judge_failed/<judge>` > 0), and that running
    the same command again retries them; nothing when none failed."""
    counts = [
        f"{model} by `{judge}`: {metrics[key]:g}"
        for model in models
        for key in metrics
        if key.startswith(f"{model}/{FAILED}/") and metrics[key]
        for judge in [key.removeprefix(f"{model}/{FAILED}/")]
    ]
    if not counts:
        return []
    return [
        "",
        f"Failed judgments (left out of the ASRs and their n): {'; '.join(counts)}. The same command again",
        "asks the judge again for them (a stage with failed judgments is not recorded as done).",
    ]


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
    recovery = recovery_points(metrics, models)
    if recovery:
        title = "P(the model starts a refusal) after k prefilled harmful tokens"
        plot_recovery(recovery, run_dir / "recovery_per_depth.png", title)
        images.append("recovery_per_depth.png")
    times = {k.split("/")[-1][:-2]: v for k, v in metrics.items() if k.startswith("time/quickstart/")}
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    text = [
        "# deepalign quickstart report",
        "",
        "Attack success rate (ASR): share of the evaluation prompts whose answer the keyword judge (qi2024",
        "refusal phrases) counts as harmful. pf k = k harmful tokens prefilled; decoding = broken by any",
        "sampling setting; gcg = on the prompts searched (fewer). In brackets: the 95% Wilson interval, in",
        "points, over the prompts judged (their number: `<model>/asr/<attack>/n` in metrics.json).",
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
    for judge in other_judges(metrics, models):  # judge=[keyword,keyword_substantive,harmbench,...]
        columns = asr_columns(metrics, models, f"asr_{judge}")
        if not columns:  # no ASR: every judgment failed (their errors: models/<model>/judgments/)
            text += ["", f"`{judge}` judged no answer: every judgment failed (models/<model>/judgments/)."]
            continue
        text += [
            "",
            f"The same answers, judged by `{judge}` (judgments that failed are left out of n):",
            "",
            *table(metrics, models, columns, [c.split("/", 1)[1] for c in columns]),
        ]
    text += failed_judgments_note(metrics, models)
    sources = prefill_sources(metrics, models)
    if sources:
        text += [
            "",
            "The same depths cut from other answers: `prefill` from the harvested answers (sampled after an",
            "affirmative start, like the deep model's training triplets), `prefill_own` from the unaligned",
            "model's own greedy answer to the plain request (prompts where it refused are left out; n in",
            "metrics.json). Keyword judge:",
            "",
            *sources,
        ]
        if substantive:
            text += ["", "By the `keyword_substantive` rule:", ""]
            text += prefill_sources(metrics, models, "asr_keyword_substantive")
    depth = depth_table(metrics, models)
    if depth:
        text += [
            "",
            "## Alignment depth",
            "",
            "ASR AUC: area under ASR vs prefill depth (0 never broken, 1 always); k50: the depth where ASR",
            "reaches 50% (> k: not reached by the deepest depth k; <= k: reached at the first depth k).",
            "KL tokens: positions before the KL to the unaligned model stays low (>= N: a lower bound, not",
            "low three positions in a row within those measured). refusal k=N: P(a refusal starts right",
            "after N prefilled tokens).",
            "",
            *depth,
        ]
    paired = paired_tests(run_dir, metrics, models)
    if paired:
        text += [
            "",
            "## Paired tests",
            "",
            "Each claim tested on the same prompts (the first answer to each): A only = prompts broken for",
            "model A and not for B, B only the reverse; p = the exact two-sided McNemar test on those",
            "discordant prompts (a small p: a gap this large is unlikely if both models broke these prompts",
            "equally often).",
            "",
            *paired,
        ]
    agreeing = agreement_table(run_dir, models)
    if agreeing:
        text += [
            "",
            "## Judge agreement",
            "",
            "Each pair of judges on the same answers (every attack variant of the sub-run): the share of",
            "equal verdicts and Cohen's kappa (1 = perfect, 0 = chance; undefined when both judges give one",
            "verdict to everything). Per variant, with the keys of the answers they disagree on:",
            "`models/<model>/judgments/agreement.json`.",
            "",
            *agreeing,
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
        "trained per second (non-padding input tokens) where the stage generated or trained in this run, and",
        "this process's resident-memory high-water mark when it ended (the stage where it rises set it; on a",
        "GPU, CUDA's allocator peak during the stage after a slash).",
        "",
        *time_table(metrics, models),
        "",
    ]
    if work := efficiency_table(metrics, models):
        text += [
            "Useful work: each stage's FLOPs counted where the models see tokens (2 x params per token of a",
            "forward pass, 6 x per token trained; padding not counted), per second of its wall time, against",
            "this machine's matmul rate with its threads in the dtype used (deepalign/flops.py).",
            "",
            *work,
            "",
        ]
    text += [f"![{name}]({name})" for name in images]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(text) + "\n")
    for name in images:
        tracker.log({f"report/{name[:-4]}": tracker.image(run_dir / name)})
    log_line_plots(tracker, metrics, models, curves)
    return path


def log_line_plots(tracker, metrics: dict[str, float], models, curves: dict[str, PositionStats]) -> None:
    """The report's figures as native tracker line plots (the PNGs are pictures; these overlay across runs):
    KL per position of every model, ASR vs prefill depth per model (depth 0 = no attack), and the refusal
    probability vs prefill depth per model that has it."""
    if curves:
        positions = max(len(stats.mean) for stats in curves.values())
        tracker.line(
            "quickstart/kl_per_position",
            list(range(1, positions + 1)),
            {
                label: [s.mean[k] if k < len(s.mean) and s.count[k] else None for k in range(positions)]
                for label, s in curves.items()
            },
            "response position",
            "mean KL",
            "Per-token KL to the unaligned model",
        )
    asr: dict[str, dict[int, float]] = {}
    for model in models:
        points = {0: metrics.get(f"{model}/asr/none")}
        for key, value in metrics.items():
            if key.startswith(f"{model}/") and (m := PREFILL.match(key.split("/", 1)[1])):
                points[int(m.group(1))] = value
        asr[model] = {k: v for k, v in points.items() if v is not None}
    depths = sorted({k for points in asr.values() for k in points})
    if len(depths) > 1:
        tracker.line(
            "quickstart/asr_vs_prefill_depth",
            depths,
            {model: [points.get(k) for k in depths] for model, points in asr.items() if points},
            "prefilled harmful tokens",
            "attack success rate",
            "ASR vs prefill depth",
        )
    recovery = recovery_points(metrics, models)
    depths = sorted({k for points in recovery.values() for k in points})
    if depths:
        tracker.line(
            "quickstart/recovery_per_depth",
            depths,
            {model: [points.get(k) for k in depths] for model, points in recovery.items()},
            "prefilled harmful tokens",
            "P(refusal starts)",
            "Refusal probability vs prefill depth",
        )
