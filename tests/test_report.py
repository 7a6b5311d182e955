"""The quickstart report's statistics from a small hand-made run dir: ASR cells with their Wilson intervals,
the paired McNemar tests read from the sub-runs' judgment files, the judge agreement table."""

from __future__ import annotations

import json
from pathlib import Path

from deepalign.report import asr_cell, asr_columns, other_judges, paired_tests, read_verdicts, write_report
from deepalign.tracking import NullTracker

MODELS = ["shallow", "deep", "ft_sft", "ft_constrained"]


def rate(model: str, key: str, value: float, n: int, low: float, high: float) -> dict[str, float]:
    base = f"{model}/{key}"
    return {base: value, f"{base}/n": n, f"{base}/ci95_low": low, f"{base}/ci95_high": high}


METRICS: dict[str, float] = {
    **rate("shallow", "asr/none", 0.1, 10, 0.0179, 0.4042),
    **rate("shallow", "asr/prefill/k=5", 0.9, 10, 0.5958, 0.9821),
    **rate("shallow", "asr/prefill/k=20", 1.0, 10, 0.7225, 1.0),  # deep was not attacked at 20: no test
    **rate("deep", "asr/none", 0.0, 10, 0.0, 0.2775),
    **rate("deep", "asr/prefill/k=5", 0.2222, 9, 0.0632, 0.5474),
    **rate("shallow", "asr_keyword_substantive/prefill/k=5", 0.5, 10, 0.2366, 0.7634),
    **rate("ft_sft", "asr/none", 1.0, 5, 0.5655, 1.0),
    **rate("ft_constrained", "asr/none", 0.0, 5, 0.0, 0.4345),
    "deep/asr/decoding": 0.3,  # a run from before intervals: no /ci95_* keys
}


def judgment(variant: str, prompt: int, harmful: bool | None, sample: int = 0) -> dict:
    return {
        "key": f"{variant}/{prompt}/{sample}",
        "variant": variant,
        "prompt_id": str(prompt),
        "harmful": harmful,
    }


def write_judgments(run_dir: Path, model: str, name: str, records: list[dict], junk: str = "") -> None:
    folder = run_dir / "models" / model / "judgments"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(junk + "".join(json.dumps(r) + "\n" for r in records))


def fake_run(run_dir: Path) -> None:
    """shallow breaks prompts 1..9 at k=5, deep prompts 0 and 1, and its verdict on 9 failed: on the 9
    prompts both judged, 7 are broken for shallow only, 1 for deep only."""
    shallow = [judgment("prefill/k=5", i, i != 0) for i in range(10)]
    shallow.append(judgment("prefill/k=5", 0, True, sample=1))  # a second sample: not paired
    deep = [judgment("prefill/k=5", i, i < 2) for i in range(9)] + [judgment("prefill/k=5", 9, None)]
    write_judgments(run_dir, "shallow", "prefill.keyword.jsonl", shallow, junk='{"torn line\n')
    write_judgments(run_dir, "deep", "prefill.keyword.jsonl", deep)
    # a judge of one sub-run only: nothing to pair
    write_judgments(run_dir, "shallow", "prefill.keyword_substantive.jsonl", shallow[:10])
    write_judgments(run_dir, "ft_sft", "none.keyword.jsonl", [judgment("none", i, True) for i in range(5)])
    write_judgments(
        run_dir, "ft_constrained", "none.keyword.jsonl", [judgment("none", i, False) for i in range(5)]
    )
    pair = "keyword~keyword_substantive"
    for model, stats in (
        ("shallow", {"n": 10, "agreement": 0.8, "kappa": 0.6}),
        ("deep", {"n": 4, "agreement": 1.0, "kappa": None}),
    ):
        path = run_dir / "models" / model / "judgments" / "agreement.json"
        path.write_text(json.dumps({"judges": pair.split("~"), "variants": {}, "all": {pair: stats}}))


def test_asr_columns_leave_out_n_and_intervals():
    assert asr_columns(METRICS, MODELS) == ["asr/none", "asr/prefill/k=5", "asr/prefill/k=20", "asr/decoding"]
    assert asr_columns(METRICS, MODELS, "asr_keyword_substantive") == ["asr_keyword_substantive/prefill/k=5"]


def test_asr_cells_show_the_wilson_interval():
    assert asr_cell(METRICS, "shallow/asr/prefill/k=5") == "90% [60, 98]"
    assert asr_cell(METRICS, "deep/asr/none") == "0% [0, 28]"
    assert asr_cell(METRICS, "deep/asr/decoding") == "30.0%"  # no interval recorded
    assert asr_cell(METRICS, "deep/asr/gcg") == "-"


def test_read_verdicts_pairs_first_samples_of_one_variant(tmp_path):
    fake_run(tmp_path)
    shallow = read_verdicts(tmp_path, "shallow", "prefill", "keyword", "prefill/k=5")
    assert shallow == {str(i): i != 0 for i in range(10)}  # the torn line and sample 1 left out
    deep = read_verdicts(tmp_path, "deep", "prefill", "keyword", "prefill/k=5")
    assert sorted(deep, key=int) == [str(i) for i in range(9)]  # the failed judgment left out
    assert read_verdicts(tmp_path, "deep", "prefill", "keyword", "prefill/k=10") == {}
    assert read_verdicts(tmp_path, "unaligned", "prefill", "keyword", "prefill/k=5") == {}


def test_paired_tests_mcnemar_on_the_same_prompts(tmp_path):
    fake_run(tmp_path)
    rows = paired_tests(tmp_path, METRICS, MODELS)
    assert rows[0].startswith("| models A vs B | attack | judge | prompts |")
    # 9 prompts: shallow 8/9, deep 2/9; discordant 7 and 1: p = 2 * (1 + 8) / 2^8 = 0.0703125
    # ft: 5 prompts, all broken for ft_sft only: p = 2 / 2^5 = 0.0625
    assert rows[2:] == [
        "| shallow vs deep | prefill/k=5 | keyword | 9 | 89% | 22% | 7 | 1 | 0.0703 |",
        "| ft_sft vs ft_constrained | none | keyword | 5 | 100% | 0% | 5 | 0 | 0.0625 |",
    ]
    assert paired_tests(tmp_path, METRICS, ["shallow", "deep"])[2:] == rows[2:3]
    assert paired_tests(tmp_path / "elsewhere", METRICS, MODELS) == []


def table_after(report: str, heading: str) -> list[str]:
    """The lines of the first markdown table after `heading`."""
    lines = report.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_write_report_sections(tmp_path):
    fake_run(tmp_path)
    report = write_report(tmp_path, METRICS, MODELS, NullTracker()).read_text()
    assert "| shallow | 10% [2, 40] | 90% [60, 98] | 100% [72, 100] | - |" in report
    assert "| deep | 0% [0, 28] | 22% [6, 55] | - | 30.0% |" in report
    assert "| shallow | 50% [24, 76] |" in report  # the substantive rule's table
    assert report.index("## Paired tests") < report.index("## Judge agreement") < report.index("Over-refusal")
    assert table_after(report, "## Paired tests")[2:] == paired_tests(tmp_path, METRICS, MODELS)[2:]
    assert table_after(report, "## Judge agreement") == [
        "| model | judges | answers | agreement | kappa |",
        "|---|---|---|---|---|",
        "| shallow | keyword vs keyword_substantive | 10 | 80.0% | 0.60 |",
        "| deep | keyword vs keyword_substantive | 4 | 100.0% | undefined |",  # ft_*: no agreement.json
    ]

    bare = tmp_path / "bare"
    bare.mkdir()
    text = write_report(bare, METRICS, MODELS, NullTracker()).read_text()
    assert "## Paired tests" not in text and "## Judge agreement" not in text


def test_every_further_judge_gets_its_own_table(tmp_path):
    """judge=[keyword,keyword_substantive,harmbench]: harmbench's ASR with intervals in a table of its own;
    a judge whose every judgment failed is named, not shown as an empty table."""
    models = ["shallow", "deep"]
    metrics = {
        **rate("shallow", "asr/none", 0.5, 4, 0.15, 0.85),
        **rate("shallow", "asr_harmbench/none", 0.25, 4, 0.0456, 0.6994),
        **rate("deep", "asr_harmbench/none", 0.0, 4, 0.0, 0.4899),
        "shallow/asr_wildguard/none/n": 0,
    }
    assert other_judges(metrics, models) == ["harmbench", "wildguard"]
    report = write_report(tmp_path, metrics, models, NullTracker()).read_text()
    assert "judged by `harmbench`" in report
    assert "| shallow | 25% [5, 70] |" in report and "| deep | 0% [0, 49] |" in report
    assert "`wildguard` judged no answer: every judgment failed" in report


class LineTracker(NullTracker):
    def __init__(self):
        self.lines: dict[str, dict] = {}

    def line(self, key, xs, ys_by_series, x_name, y_name, title):
        self.lines[key] = dict(xs=list(xs), ys=dict(ys_by_series))


def test_alignment_depth_section_and_recovery_figure(tmp_path):
    """Per model: ASR AUC and k50 by each judge (censored: "> deepest depth"), the KL tokens (censored:
    ">= positions measured") and the refusal probability per depth; "-" where a model lacks one, no row
    for a model without any. The
    recovery figure and line plot have one line per model that has the curve."""
    models = ["unaligned", "shallow", "deep", "ft_sft"]
    metrics = {
        "unaligned/depth/recovery/k=0": 0.001,
        "unaligned/depth/recovery/k=0/n": 10,
        "unaligned/depth/recovery/k=5": 0.0005,
        "shallow/depth/asr_auc": 0.85,  # the primary judge's copy: no column of its own
        "shallow/depth_keyword/asr_auc": 0.85,
        "shallow/depth_keyword/k50": 2.5,
        "shallow/depth_keyword/k50_censored": 0,
        "shallow/depth_keyword_substantive/asr_auc": 0.5,
        "shallow/depth_keyword_substantive/k50": 12.3333,
        "shallow/depth_keyword_substantive/k50_censored": 0,
        "shallow/depth_keyword/own/asr_auc": 0.9,  # another prefill instance: not in the table
        "shallow/depth/kl_tokens": 3,
        "shallow/depth/kl_tokens_censored": 0,
        "shallow/depth/recovery/k=0": 0.9,
        "shallow/depth/recovery/k=5": 0.05,
        "deep/depth_keyword/asr_auc": 0.1,
        "deep/depth_keyword/k50": 40,
        "deep/depth_keyword/k50_censored": 1,
        "deep/depth/kl_tokens": 40,
        "deep/depth/kl_tokens_censored": 1,
        "deep/depth/recovery/k=0": 0.95,
        "deep/depth/recovery/k=5": 0.8,
        "deep/depth/recovery/k=40": 0.5,
    }
    tracker = LineTracker()
    report = write_report(tmp_path, metrics, models, tracker).read_text()
    assert table_after(report, "## Alignment depth") == [
        "| model | ASR AUC (keyword) | k50 (keyword) | ASR AUC (keyword_substantive) | "
        "k50 (keyword_substantive) | KL tokens | refusal k=0 | refusal k=5 | refusal k=40 |",
        "|---|---|---|---|---|---|---|---|---|",
        "| unaligned | - | - | - | - | - | 0.1% | 0.05% | - |",
        "| shallow | 0.85 | 2.5 | 0.50 | 12.3 | 3 | 90% | 5% | - |",
        "| deep | 0.10 | > 40 | - | - | >= 40 | 95% | 80% | 50% |",
    ]  # ft_sft has none of the figures: no row
    assert "![recovery_per_depth.png](recovery_per_depth.png)" in report
    assert (tmp_path / "recovery_per_depth.png").read_bytes()[:4] == b"\x89PNG"
    line = tracker.lines["quickstart/recovery_per_depth"]
    assert line["xs"] == [0, 5, 40]
    assert line["ys"] == {
        "unaligned": [0.001, 0.0005, None],
        "shallow": [0.9, 0.05, None],
        "deep": [0.95, 0.8, 0.5],
    }

    bare = tmp_path / "bare"
    bare.mkdir()
    text = write_report(bare, METRICS, MODELS, LineTracker()).read_text()
    assert "## Alignment depth" not in text and "recovery_per_depth" not in text
    assert not (bare / "recovery_per_depth.png").exists()
