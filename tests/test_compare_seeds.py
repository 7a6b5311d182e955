"""`deepalign-compare` over seeds: runs that differ only in `seed` become one point with the mean and the 95%
interval of the mean (Student's t); single-seed comparisons print exactly what they printed before."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from deepalign import compare
from deepalign.compare import main as compare_main

T2 = 4.302653  # Student's t, 0.975 quantile, 2 degrees of freedom (three seeds)
T1 = 12.706205  # 1 degree of freedom (two values)


def make_run(run: Path, seed: int, overrides: dict[str, object], metrics: dict, config: dict | None = None):
    """A run dir as `deepalign` leaves it: config.yaml (seed interpolated into model/train, paths naming the
    run dir), .hydra/overrides.yaml, metrics.json and stages.json (every stage done)."""
    run.mkdir(parents=True)
    (run / ".hydra").mkdir()
    items = [f"seed={seed}", *(f"{k}={v}" for k, v in overrides.items())]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(items))
    beta = overrides.get("loss.beta.prefix", 2.0)
    resolved = {
        "stages": ["train", "attack"],
        "seed": seed,
        "paths": {"output_dir": str(run.parent), "cache_dir": "~/.cache/deepalign"},
        "model": {"name": "tiny", "seed": seed},
        "loss": {"name": "constrained", "beta": {"prefix": float(beta)}},
        "train": {"max_steps": 2, "seed": seed},
        "logger": {"name": "wandb", "run_name": f"run-{seed}"},
        "eval": {"prompts": str(run / "quickstart" / "data" / "eval.jsonl")},
        **(config or {}),
    }
    (run / "config.yaml").write_text(yaml.safe_dump(resolved))
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "stages.json").write_text(json.dumps({stage: "0123456789abcdef" for stage in resolved["stages"]}))


def seed_sweep(root: Path) -> Path:
    """A 2 x 3 multirun: loss.beta.prefix in {1, 2}, seed in {0, 1, 2}; kl/pos=1 is null in one run."""
    asr = {1: [0.2, 0.4, 0.6], 2: [0.1, 0.1, 0.4]}
    kl = {1: [0.5, 0.7, 0.9], 2: [0.3, None, 0.1]}
    job = 0
    for beta in (1, 2):
        for seed in range(3):
            metrics = {
                "asr/prefill/k=5": asr[beta][seed],
                "asr/prefill/k=5/n": 10,
                "asr/prefill/k=5/ci95_low": 0.0,
                "asr/prefill/k=5/ci95_high": 1.0,
                "kl/pos=1": kl[beta][seed],
                "train/steps": 2,
            }
            make_run(root / str(job), seed, {"loss.beta.prefix": beta}, metrics)
            job += 1
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_three_seeds_by_two_points_give_mean_std_and_t_interval(tmp_path):
    sweep = seed_sweep(tmp_path / "multirun")
    assert compare_main([str(sweep), "--metrics", "asr/*", "kl/pos=1"]) == 0
    rows = read_csv(sweep / "compare.csv")
    assert list(rows[0]) == [
        "run",
        "loss.beta.prefix",
        "n_seeds",
        *(f"asr/prefill/k=5/{k}" for k in ("mean", "std", "ci95_low", "ci95_high")),
        *(f"kl/pos=1/{k}" for k in ("mean", "std", "ci95_low", "ci95_high")),
        "kl/pos=1/n_seeds",  # a seed's value was null: the interval rests on fewer seeds
    ], "the per-run Wilson companions of an ASR are not averaged; the seed column is gone"
    assert [(r["run"], r["loss.beta.prefix"], r["n_seeds"]) for r in rows] == [
        ("0, 1, 2", "1", "3"),
        ("3, 4, 5", "2", "3"),
    ]
    first, second = rows
    # beta=1: ASR 0.2, 0.4, 0.6 -> mean 0.4, sample std 0.2, half width t(2) * 0.2 / sqrt(3)
    half = T2 * 0.2 / math.sqrt(3)
    assert float(first["asr/prefill/k=5/mean"]) == pytest.approx(0.4, rel=1e-3)
    assert float(first["asr/prefill/k=5/std"]) == pytest.approx(0.2, rel=1e-3)
    assert float(first["asr/prefill/k=5/ci95_low"]) == pytest.approx(0.4 - half, rel=1e-3)
    assert float(first["asr/prefill/k=5/ci95_high"]) == pytest.approx(0.4 + half, rel=1e-3)
    assert first["kl/pos=1/n_seeds"] == "3"
    # beta=2: kl 0.3, null, 0.1 -> the null is left out: mean 0.2 of two, std sqrt(0.02), t(1)
    assert second["kl/pos=1/n_seeds"] == "2"
    assert float(second["kl/pos=1/mean"]) == pytest.approx(0.2, rel=1e-3)
    assert float(second["kl/pos=1/std"]) == pytest.approx(math.sqrt(0.02), rel=1e-3)
    half = T1 * math.sqrt(0.02) / math.sqrt(2)
    assert float(second["kl/pos=1/ci95_low"]) == pytest.approx(0.2 - half, rel=1e-3)
    assert float(second["kl/pos=1/ci95_high"]) == pytest.approx(0.2 + half, rel=1e-3)
    table = (sweep / "compare.md").read_text().splitlines()
    assert table[0].startswith("| run | loss.beta.prefix | n_seeds | asr/prefill/k=5/mean |")
    assert len(table) == 2 + 2
    for name in ("asr_vs_loss_beta_prefix.png", "asr_vs_prefill_depth.png", "kl_per_position.png"):
        assert (sweep / name).read_bytes()[:4] == b"\x89PNG"


def test_plots_draw_the_interval_over_seeds_as_error_bars(tmp_path, monkeypatch):
    sweep = seed_sweep(tmp_path / "multirun")
    figures = {}
    monkeypatch.setattr(compare, "_save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    assert compare_main([str(sweep), "--metrics", "asr/*"]) == 0
    ax = figures["asr_vs_prefill_depth.png"].axes[0]
    assert ax.get_title() == "error bars: 95% interval of the mean over seeds"
    bars = [c for c in ax.containers if c.has_yerr]
    assert len(bars) == 2
    # the vertical segment of beta=1 at k=5 spans the interval of the mean over its three seeds
    (segment,) = bars[0].lines[2][0].get_segments()
    half = T2 * 0.2 / math.sqrt(3)
    assert segment[:, 0].tolist() == [5, 5]
    assert segment[:, 1].tolist() == pytest.approx([0.4 - half, 0.4 + half], rel=1e-6)


@pytest.mark.parametrize("recorded", ["output_dir", "cwd"])
def test_seeds_group_by_resolved_config_not_by_overrides(tmp_path, recorded):
    """Runs with the same overrides but different configs are different points; paths into each run dir
    (here written relative: relative to the recorded paths.output_dir=outputs, or to the folder the run
    started in, Hydra's hydra.runtime.cwd) do not split seeds."""
    root = tmp_path / "outputs" / "multirun" / "2026-01-01" / "10-00-00"
    for job, (seed, steps) in enumerate([(0, 2), (1, 2), (0, 7)]):
        relative = Path("outputs/multirun/2026-01-01/10-00-00") / str(job)
        config = {
            "train": {"max_steps": steps, "seed": seed},
            "eval": {"prompts": f"{relative}/quickstart/data/eval.jsonl"},
        }
        if recorded == "output_dir":
            config["paths"] = {"output_dir": "outputs"}
        make_run(root / str(job), seed, {}, {"asr/none": 0.1 * (job + 1)}, config)
        if recorded == "cwd":
            hydra = {"hydra": {"job": {"num": job}, "runtime": {"cwd": str(tmp_path)}}}
            (root / str(job) / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    rows, varying, _ = compare.collect(compare.find_runs([root]), ("asr/*",))
    groups = compare.seed_groups(rows)
    assert [[r["run"].name for r in g] for g in groups] == [["0", "1"], ["2"]]
    assert compare_main([str(root), "--metrics", "asr/*"]) == 0
    rows = read_csv(root / "compare.csv")
    assert [(r["run"], r["n_seeds"], r["asr/none/std"]) for r in rows] == [
        ("0, 1", "2", f"{math.sqrt(0.005):.4g}"),
        ("2", "1", ""),  # one seed: no spread, no interval
    ]


def test_quickstart_models_are_points_never_seeds_of_each_other(tmp_path):
    """A quickstart run's models/<name> sub-runs hold their own metrics.json: each is a point of its own,
    aggregated with the same model of the other seeds, not with its siblings or its parent."""
    sweep = tmp_path / "multirun"
    for seed in range(3):
        run = sweep / str(seed)
        make_run(run, seed, {"experiment": "quickstart"}, {"shallow/asr/none": 0.5, "deep/asr/none": 0.1})
        for name, asr in (("shallow", 0.5 + 0.1 * seed), ("deep", 0.1 * seed)):
            config = {
                "model": {"name": "tiny", "seed": seed, "path": str(run / "models" / name / "model")},
                "loss": {"name": name},
            }
            make_run(run / "models" / name, seed, {}, {"asr/none": asr}, config)
    assert compare_main([str(sweep), "--metrics", "asr/*", "*/asr/none"]) == 0
    rows = read_csv(sweep / "compare.csv")
    assert [(r["run"], r["n_seeds"]) for r in rows] == [
        ("0, 1, 2", "3"),
        ("0/models/deep, 1/models/deep, 2/models/deep", "3"),
        ("0/models/shallow, 1/models/shallow, 2/models/shallow", "3"),
    ]
    assert float(rows[1]["asr/none/mean"]) == pytest.approx(0.1)
    assert float(rows[2]["asr/none/mean"]) == pytest.approx(0.6)
    assert rows[0]["asr/none/mean"] == "" and float(rows[0]["shallow/asr/none/mean"]) == pytest.approx(0.5)


def test_a_single_quickstart_run_is_not_aggregated(tmp_path):
    run = tmp_path / "run"
    make_run(run, 0, {}, {"shallow/asr/none": 0.5})
    for name in ("shallow", "deep"):
        make_run(run / "models" / name, 0, {}, {"asr/none": 0.5}, {"loss": {"name": name}})
    assert compare_main([str(run), "--metrics", "asr/*"]) == 0
    assert (run / "compare.md").read_text() == (
        "| run | asr/none |\n|---|---|\n| . |  |\n| models/deep | 0.5 |\n| models/shallow | 0.5 |\n"
    )


def test_single_seed_output_is_unchanged(tmp_path, capsys):
    """One seed per point: the table, its columns and the printout are exactly those of a comparison
    without seeds (the run column, the varying overrides, the metrics as recorded)."""
    sweep = tmp_path / "multirun"
    for job, beta in enumerate((1, 2)):
        metrics = {"asr/none": 0.25 * (job + 1), "asr/prefill/k=5": 0.5, "kl/pos=1": None, "train/x": 1}
        make_run(sweep / str(job), 0, {"loss.beta.prefix": beta}, metrics)
    assert compare_main([str(sweep)]) == 0
    assert (sweep / "compare.md").read_text() == (
        "| run | loss.beta.prefix | asr/none | asr/prefill/k=5 | kl/pos=1 |\n"
        "|---|---|---|---|---|\n"
        "| 0 | 1 | 0.25 | 0.5 |  |\n"
        "| 1 | 2 | 0.5 | 0.5 |  |\n"
    )
    assert (sweep / "compare.csv").read_bytes().decode() == (
        "run,loss.beta.prefix,asr/none,asr/prefill/k=5,kl/pos=1\r\n0,1,0.25,0.5,\r\n1,2,0.5,0.5,\r\n"
    )
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"2 runs; wrote {sweep / 'compare.md'}")


def test_single_run_asr_plot_has_wilson_error_bars_when_recorded(tmp_path, monkeypatch):
    run = tmp_path / "run"
    make_run(
        run,
        0,
        {},
        {
            "asr/prefill/k=5": 0.5,
            "asr/prefill/k=5/ci95_low": 0.3,
            "asr/prefill/k=5/ci95_high": 0.7,
            "asr/prefill/k=10": 0.8,  # no interval recorded: no bar
        },
    )
    figures = {}
    monkeypatch.setattr(compare, "_save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    assert compare_main([str(run)]) == 0
    ax = figures["asr_vs_prefill_depth.png"].axes[0]
    assert ax.get_title() == "error bars: 95% Wilson interval over prompts"
    (bars,) = [c for c in ax.containers if c.has_yerr]
    assert bars.lines[0].get_xdata().tolist() == [5, 10], "the Wilson companions are not points"
    segments = bars.lines[2][0].get_segments()
    assert segments[0][:, 0].tolist() == [5, 5]
    assert segments[0][:, 1].tolist() == pytest.approx([0.3, 0.7])
    assert segments[1].size == 0, "k=10 has no recorded interval: no bar, not a made-up one"


def test_a_run_repeated_with_the_same_seed_is_not_a_second_seed(tmp_path, capsys):
    """The same config and seed run twice: two rows as before, not a point of two seeds; next to other
    seeds of its point the repeat is left out of the mean, with a warning."""
    runs = tmp_path / "runs"
    make_run(runs / "a", 0, {}, {"asr/none": 0.2})
    make_run(runs / "b", 0, {}, {"asr/none": 0.4})
    assert compare_main([str(runs), "--metrics", "asr/*"]) == 0
    assert (runs / "compare.md").read_text() == "| run | asr/none |\n|---|---|\n| a | 0.2 |\n| b | 0.4 |\n"
    make_run(runs / "c", 1, {}, {"asr/none": 0.6})
    assert compare_main([str(runs), "--metrics", "asr/*"]) == 0
    (row,) = read_csv(runs / "compare.csv")
    assert (row["run"], row["n_seeds"], float(row["asr/none/mean"])) == ("a, c", "2", pytest.approx(0.4))
    warning = f"warning: {(runs / 'b').resolve()} repeats a seed of its point: left out"
    assert warning in capsys.readouterr().err


def test_censored_seeds_make_the_mean_a_bound_with_their_count(tmp_path):
    """The issue's case: k50 over seeds 40 (censored: ASR never reached 50% by depth 40), 10 and 12. The
    censored seed counts at its bound, so the mean 20.67 is a lower bound: ">= 20.67", one seed censored,
    no std or interval. Exact seeds stay exact; a left-censored value is an upper bound ("<=")."""
    sweep = tmp_path / "multirun"
    k50 = [(40.0, 1, 0), (10.0, 0, 0), (12.0, 0, 0)]  # (k50, right-censored, left-censored)
    kl = [(5, 0), (7, 0), (9, 0)]
    for seed, ((value, right, left), (tokens, cut)) in enumerate(zip(k50, kl)):
        metrics = {
            "depth/k50": value,
            "depth/k50_censored": right,
            "depth/k50_left_censored": left,
            "depth/own/k50": 5.0,
            "depth/own/k50_censored": 0,
            "depth/own/k50_left_censored": 1,
            "depth/kl_tokens": tokens,
            "depth/kl_tokens_censored": cut,
        }
        make_run(sweep / str(seed), seed, {}, metrics)
    assert compare_main([str(sweep), "--metrics", "depth/k50", "depth/own/k50", "depth/kl_tokens"]) == 0
    (row,) = read_csv(sweep / "compare.csv")
    assert row["depth/k50/mean"] == ">= 20.67" and row["depth/k50/n_censored"] == "1"
    assert row["depth/k50/std"] == row["depth/k50/ci95_low"] == row["depth/k50/ci95_high"] == ""
    assert row["depth/own/k50/mean"] == "<= 5" and row["depth/own/k50/n_censored"] == "3"
    assert row["depth/kl_tokens/mean"] == "7" and row["depth/kl_tokens/n_censored"] == "0"
    assert float(row["depth/kl_tokens/std"]) == pytest.approx(2.0)
    table = (sweep / "compare.md").read_text()
    assert "| >= 20.67 |" in table and "| <= 5 |" in table
    # censored both ways among the seeds: the mean is no bound either way, left empty
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    (sweep / "1" / "metrics.json").write_text(json.dumps({**metrics, "depth/k50_left_censored": 1}))
    assert compare_main([str(sweep), "--metrics", "depth/k50"]) == 0
    (row,) = read_csv(sweep / "compare.csv")
    assert row["depth/k50/mean"] == "" and row["depth/k50/n_censored"] == "2"


def test_a_single_runs_censored_value_reads_as_a_bound(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "a", 0, {}, {"depth/k50": 40.0, "depth/k50_censored": 1, "depth/kl_tokens": 3})
    make_run(runs / "b", 0, {"loss.beta.prefix": 1}, {"depth/k50": 7.5, "depth/k50_censored": 0})
    assert compare_main([str(runs), "--metrics", "depth/k50", "depth/kl_tokens"]) == 0
    assert (runs / "compare.md").read_text() == (
        "| run | loss.beta.prefix | depth/k50 | depth/kl_tokens |\n"
        "|---|---|---|---|\n"
        "| a |  | >= 40 | 3 |\n"
        "| b | 1 | 7.5 |  |\n"
    )


def failed_sweep(root: Path) -> Path:
    """A multirun of 2 x 2 jobs as Hydra's basic sweeper leaves it when job 1's metrics.json was cut short,
    job 2 failed before its first stage finished and job 3 never started; job 0 is fine."""
    task = ["model=tiny", "loss.beta.prefix=1,2", "seed=0,1"]
    hydra = {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}
    }
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {**hydra, "overrides": {"task": task}}}))
    for job, (beta, seed) in enumerate([(1, 0), (1, 1), (2, 0)]):
        make_run(root / str(job), seed, {"loss.beta.prefix": beta}, {"asr/none": 0.5})
        record = {"hydra": {"job": {"num": job}, "runtime": {"cwd": str(root)}}}
        (root / str(job) / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(record))
    (root / "1" / "metrics.json").write_text('{"asr/none": 0.5, "asr/none/n": 1')  # truncated
    (root / "2" / "metrics.json").unlink()
    (root / "2" / "stages.json").unlink()
    return root


def test_a_damaged_metrics_json_and_failed_jobs_are_named_and_the_table_still_written(tmp_path, capsys):
    sweep = failed_sweep(tmp_path / "multirun")
    assert compare_main([str(sweep), "--metrics", "asr/*"]) == 0
    md = (sweep / "compare.md").read_text()
    assert md.startswith("| run | asr/none |\n|---|---|\n| 0 | 0.5 |\n\nLeft out of the table:\n\n")
    listed = md.split("Left out of the table:\n\n")[1].splitlines()
    assert listed == [
        "- job 3 of 4 (loss.beta.prefix=2 seed=1) never ran (no run dir)",
        "- 1: metrics.json, line 1, column 34: not valid JSON (Expecting ',' delimiter): damaged or "
        "truncated",
        "- 2: no metrics.json: the run failed before its first stage finished, or still runs",
    ]
    assert read_csv(sweep / "compare.csv") == [{"run": "0", "asr/none": "0.5"}]
    err = capsys.readouterr().err
    assert f"warning: {sweep.resolve() / '1'}: {sweep.resolve() / '1' / 'metrics.json'}, line 1" in err
    # a run whose config's stages are not all recorded done (failed midway): listed, not averaged
    (sweep / "1" / "metrics.json").write_text(json.dumps({"asr/none": 0.9}))
    (sweep / "1" / "stages.json").write_text(json.dumps({"train": "0123456789abcdef"}))
    assert compare_main([str(sweep), "--metrics", "asr/*"]) == 0
    assert (
        "- 1: stage attack not recorded as done in stages.json: the run failed, or still runs"
        in (sweep / "compare.md").read_text()
    )


def test_a_value_ending_in_the_job_number_is_not_the_run_dir(tmp_path, capsys):
    """`model.adapter_path=adapters/0,adapters/1` over seeds 0, 1: job 0 holds adapters/0 and job 1
    adapters/1. They are two points of two seeds each, not one point whose second job repeats a seed."""
    sweep = tmp_path / "multirun"
    jobs = [("adapters/0", 0), ("adapters/1", 0), ("adapters/0", 1), ("adapters/1", 1)]
    for job, (adapter, seed) in enumerate(jobs):
        config = {"model": {"name": "tiny", "seed": seed, "adapter_path": adapter}}
        make_run(sweep / str(job), seed, {"model.adapter_path": adapter}, {"asr/none": 0.1 * job}, config)
    rows, _, _ = compare.collect(compare.find_runs([sweep]), ("asr/*",))
    assert [[r["run"].name for r in g] for g in compare.seed_groups(rows)] == [["0", "2"], ["1", "3"]]
    assert compare_main([str(sweep), "--metrics", "asr/*"]) == 0
    rows = read_csv(sweep / "compare.csv")
    assert [(r["run"], r["model.adapter_path"], r["n_seeds"]) for r in rows] == [
        ("0, 2", "adapters/0", "2"),
        ("1, 3", "adapters/1", "2"),
    ]
    assert "repeats a seed" not in capsys.readouterr().err


def test_a_run_dir_named_through_a_symlink_is_still_the_run_dir(tmp_path):
    """Hydra writes the run dir as it was given (`hydra.runtime.output_dir`), through a symlinked output
    folder; config paths into it do not split the seeds of a point."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    sweep = tmp_path / "link" / "multirun"
    for job, seed in enumerate([0, 1]):
        run = sweep / str(job)
        config = {"eval": {"prompts": f"{run}/quickstart/data/eval.jsonl"}}
        make_run(run, seed, {}, {"asr/none": 0.5}, config)
        hydra = {"hydra": {"job": {"num": job}, "runtime": {"cwd": str(tmp_path), "output_dir": str(run)}}}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    rows, _, _ = compare.collect(compare.find_runs([sweep]), ("asr/*",))
    assert [[r["run"].name for r in g] for g in compare.seed_groups(rows)] == [["0", "1"]]
