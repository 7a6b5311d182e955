"""What the stages send to the tracker beyond scalars: the attack stage's table of answers and verdicts, the
KL and ASR line plots; and that real W&B (offline) stores both."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import compose_config

from deepalign import cli, runner
from deepalign.kl import PositionStats
from deepalign.report import write_report
from deepalign.stages import analyze as analyze_stage
from deepalign.storage.jsonl import JsonlStore
from deepalign.tracking import NullTracker

HARMFUL = "Sure, here is the list: alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi."


class RecordingTracker(NullTracker):
    """Keeps every table and line plot it is given."""

    def __init__(self):
        self.tables: dict[str, tuple[list[str], list[list]]] = {}
        self.lines: dict[str, dict] = {}

    def table(self, key, columns, rows):
        assert key not in self.tables, f"{key} logged twice"
        self.tables[key] = (list(columns), [list(r) for r in rows])

    def line(self, key, xs, ys_by_series, x_name, y_name, title):
        assert key not in self.lines, f"{key} logged twice"
        self.lines[key] = dict(xs=list(xs), ys=dict(ys_by_series), x_name=x_name, y_name=y_name, title=title)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    rows = [{"prompt": f"Please answer request {i}.", "harmful": HARMFUL} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_config) -> Path:
    """The tiny model saved as a folder: the KL reference of a run without a train stage."""
    from deepalign.models import load_model

    folder = tmp_path_factory.mktemp("reference")
    loaded = load_model(tiny_model_config)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def attack_config(eval_file: Path, *overrides: str):
    return compose_config(
        [
            "model=tiny",
            "logger=none",
            "stages=[attack]",
            f"eval.prompts={eval_file}",
            "generation.max_new_tokens=5",
            "generation.batch_size=8",
            "attack=[none,prefill]",
            "attack.prefill.depths=[2]",
            "judge=[keyword,keyword_substantive]",
            *overrides,
        ]
    )


def test_attack_logs_every_generation_with_each_judge_verdict(eval_file, tmp_path, monkeypatch):
    tracker = RecordingTracker()
    monkeypatch.setattr(runner, "start_tracker", lambda *a, **k: tracker)
    run_dir = tmp_path / "run"
    # nothing is 1000 characters long: the substantive judge says "not harmful" to every answer
    cli.run(attack_config(eval_file, "judge.keyword_substantive.min_continuation_chars=1000"), run_dir)

    columns, rows = tracker.tables["attack/generations"]
    assert columns == [
        "prompt_id",
        "variant",
        "sample",
        "prefill",
        "response",
        "harmful_keyword",
        "harmful_keyword_substantive",
    ]
    assert len(rows) == 3 * 3  # 3 prompts x (no attack, prefill k=0 and k=2), one sample each
    assert sorted((r[1], r[0]) for r in rows) == sorted(
        (v, str(i)) for v in ("none", "prefill/k=0", "prefill/k=2") for i in range(3)
    )
    for attack in ("none", "prefill"):
        generated = JsonlStore(run_dir / "generations" / f"{attack}.jsonl").records
        keyword = JsonlStore(run_dir / "judgments" / f"{attack}.keyword.jsonl").records
        substantive = JsonlStore(run_dir / "judgments" / f"{attack}.keyword_substantive.jsonl").records
        mine = [r for r in rows if r[1].split("/")[0] == attack]
        assert len(mine) == 3 * (1 if attack == "none" else 2)
        for prompt_id, variant, sample, prefill, response, harmful, harmful_substantive in mine:
            key = f"{variant}/{prompt_id}/{sample}"
            g = generated[key]
            assert (prefill, response) == (g["prefill"], g["response"])
            assert harmful is keyword[key]["harmful"] and harmful in (True, False)
            assert harmful_substantive is substantive[key]["harmful"] is False
            assert (prefill == "") == (variant in ("none", "prefill/k=0"))
    assert tracker.lines == {}  # the attack stage draws no line plot


def test_analyze_logs_kl_per_position_as_a_line(eval_file, reference, tmp_path, monkeypatch):
    tracker = RecordingTracker()
    monkeypatch.setattr(runner, "start_tracker", lambda *a, **k: tracker)
    stats = PositionStats(mean=[0.5, 0.25, 0.0, 0.125], std=[0.1, 0.1, 0.0, 0.1], count=[3, 3, 0, 2])
    monkeypatch.setattr(analyze_stage, "per_token_kl", lambda *a, **k: stats)
    overrides = ["model=tiny", "logger=none", "stages=[analyze]", f"eval.prompts={eval_file}"]
    overrides += ["analysis.positions=4", f"analysis.reference={reference}"]
    metrics = cli.run(compose_config(overrides), tmp_path / "run")

    line = tracker.lines["kl/per_position"]
    assert line["xs"] == [1, 2, 4]  # position 3 has no tokens: no point
    assert line["ys"] == {"tiny": [0.5, 0.25, 0.125]}
    assert (line["x_name"], line["y_name"]) == ("response position", "mean KL")
    assert [metrics[f"kl/pos={x}"] for x in line["xs"]] == line["ys"]["tiny"]


def test_report_logs_kl_and_asr_vs_depth_lines_for_all_models(tmp_path):
    tracker = RecordingTracker()
    kl = {
        "shallow": PositionStats(mean=[0.0, 0.5, 0.25], std=[0.0, 0.1, 0.1], count=[4, 4, 4]),
        "deep": PositionStats(mean=[1.5, 2.0, 0.75], std=[0.2, 0.1, 0.1], count=[4, 4, 0]),
    }
    for model, stats in kl.items():
        folder = tmp_path / "models" / model / "analysis"
        folder.mkdir(parents=True)
        (folder / "kl.json").write_text(json.dumps({"pairs": 4, **stats.__dict__}))
    metrics = {
        "shallow/asr/none": 0.25,
        "shallow/asr/prefill/k=5": 0.75,
        "shallow/asr/prefill/k=10": 1.0,
        "deep/asr/none": 0.0,
        "deep/asr/prefill/k=10": 0.5,
        "deep/asr/prefill/k=10/n": 4,  # not a depth
        "time/quickstart/shallow_s": 10.0,
        "time/quickstart/deep_s": 20.0,
    }
    write_report(tmp_path, metrics, ["shallow", "deep"], tracker)

    kl_line = tracker.lines["quickstart/kl_per_position"]
    assert kl_line["xs"] == [1, 2, 3]
    assert kl_line["ys"] == {"shallow || unaligned": [0.0, 0.5, 0.25], "deep || unaligned": [1.5, 2.0, None]}
    asr_line = tracker.lines["quickstart/asr_vs_prefill_depth"]
    assert asr_line["xs"] == [0, 5, 10]
    assert asr_line["ys"] == {"shallow": [0.25, 0.75, 1.0], "deep": [0.0, None, 0.5]}


def wait_for(pattern: str, folder: Path) -> Path:
    """The one file under `folder` matching `pattern` (W&B's service may still be writing after finish)."""
    deadline = time.time() + 30
    while not (found := sorted(folder.glob(pattern))):
        assert time.time() < deadline, f"no {pattern} under {folder}: {list(folder.rglob('*'))}"
        time.sleep(0.2)
    assert len(found) == 1, found
    return found[0]


def test_wandb_offline_run_stores_the_table_and_the_line_plot(eval_file, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_MODE", "WANDB_DIR", "RANK", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    run_dir = tmp_path / "run"
    cfg = attack_config(
        eval_file,
        "logger=wandb",
        "logger.mode=offline",
        "stages=[attack,analyze]",
        "analysis.positions=3",
        f"analysis.reference={reference}",
    )
    cli.run(cfg, run_dir)

    [offline] = (run_dir / "wandb").glob("offline-run-*")
    table = json.loads(wait_for("files/media/table/attack/generations_*.table.json", offline).read_text())
    assert table["columns"][:5] == ["prompt_id", "variant", "sample", "prefill", "response"]
    assert len(table["data"]) == 9  # 3 prompts x (none, prefill/k=0, prefill/k=2)
    responses = {r["response"] for r in JsonlStore(run_dir / "generations" / "none.jsonl").records.values()}
    assert responses <= {row[4] for row in table["data"]}
    line = json.loads(wait_for("files/media/table/kl/per_position_*.table.json", offline).read_text())
    assert line["columns"] == ["response position", "mean KL", "series"]
    assert len(line["data"]) == 3  # positions 1..3, all with tokens
    kl = json.loads((run_dir / "analysis" / "kl.json").read_text())
    assert [row[:2] for row in line["data"]] == [
        [k + 1, m] for k, m in enumerate(kl["mean"]) if kl["count"][k]
    ]
    assert {row[2] for row in line["data"]} == {"tiny"}
    record = wait_for("run-*.wandb", offline)
    deadline = time.time() + 30
    while b"wandb/line/v0" not in record.read_bytes():  # the chart itself, not only its table
        assert time.time() < deadline, "the line chart is in the offline run"
        time.sleep(0.2)
