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
    run dir), .hydra/overrides.yaml and metrics.json."""
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


def test_seeds_group_by_resolved_config_not_by_overrides(tmp_path):
    """Runs with the same overrides but different configs are different points; paths into each run dir
    (here written relative, as with paths.output_dir=outputs) do not split seeds."""
    root = tmp_path / "outputs" / "multirun" / "2026-01-01" / "10-00-00"
    for job, (seed, steps) in enumerate([(0, 2), (1, 2), (0, 7)]):
        relative = Path("outputs/multirun/2026-01-01/10-00-00") / str(job)
        config = {
            "train": {"max_steps": steps, "seed": seed},
            "eval": {"prompts": f"{relative}/quickstart/data/eval.jsonl"},
        }
        make_run(root / str(job), seed, {}, {"asr/none": 0.1 * (job + 1)}, config)
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
