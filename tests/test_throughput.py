"""Where the time goes: the train stage's tokens/s (counted over the steps this run trained) and the
quickstart report's table of seconds and tokens/s per part and stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import compose_config, run_quickstart_stages

from deepalign import cli
from deepalign.chat import encode_for_training
from deepalign.models import load_tokenizer
from deepalign.report import time_rows, time_table

STEPS = 4


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    rows = [
        {"prompt": f"Question {i}: count to {i}.", "response": " ".join(["one"] * (2 + i))} for i in range(16)
    ]
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_config(chats: Path, cache: Path):
    return compose_config(
        [
            "model=tiny",
            "logger=none",
            "stages=[train]",
            "data=chat_file",
            f"data.components.chat.source={chats}",
            "data.max_length=64",
            "train.per_device_batch_size=4",  # 16 examples, 4 steps: exactly one epoch
            f"train.max_steps={STEPS}",
            "train.save_steps=3",  # checkpoints 3 and 4 (the last step)
            f"paths.cache_dir={cache}",
        ]
    )


def test_train_throughput_counts_the_tokens_of_the_steps_this_run_trained(chats, tmp_path):
    run_dir = tmp_path / "run"
    cfg = train_config(chats, tmp_path / "cache")
    metrics = cli.run(cfg, run_dir)
    examples = [json.loads(line) for line in (run_dir / "data" / "examples.jsonl").open()]
    assert len(examples) == 16
    tok = load_tokenizer(compose_config(["model=tiny", "logger=none"]).model)
    lengths = [
        len(encode_for_training(tok, e["prompt"], e["response"], max_length=64).input_ids) for e in examples
    ]
    # one epoch: every example's tokens once, padding not counted
    assert metrics["throughput/train/tokens"] == sum(lengths)
    seconds = metrics["throughput/train/seconds"]
    assert 0 < seconds <= metrics["time/train_s"]
    # both stored rounded (seconds to 1 ms, tokens/s to 0.1): equal within the two roundings added up
    expected = sum(lengths) / seconds
    assert metrics["throughput/train/tokens_per_s"] == pytest.approx(
        expected, abs=expected * 0.0005 / seconds + 0.05
    )

    # a resumed run counts only the steps it trained itself: here the last one
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").open()]
    seen = {row["step"]: row["train/num_input_tokens_seen"] for row in log if "train/loss" in row}
    shutil.rmtree(run_dir / "checkpoints" / f"checkpoint-{STEPS}")
    shutil.rmtree(run_dir / "model")
    (run_dir / "stages.json").unlink()
    again = cli.run(cfg, run_dir)
    assert again["train/resumed_from_step"] == STEPS - 1
    assert again["throughput/train/tokens"] == seen[STEPS] - seen[STEPS - 1] > 0

    # a finished run that is only reloaded trained nothing: no throughput of its own
    (run_dir / "stages.json").unlink()
    (run_dir / "metrics.json").unlink()
    assert "throughput/train/tokens_per_s" not in cli.run(cfg, run_dir)


def test_where_the_time_goes_table():
    metrics = {
        "time/quickstart/harvest_s": 68.0,
        "throughput/harvest/gen_tokens_per_s": 120.34,
        "memory/quickstart/harvest/rss_high_water_gib": 1.234,
        "shallow/time/utility_s": 20.0,
        "shallow/time/train_s": 50.2,
        "shallow/time/attack_s": 100.0,
        "shallow/throughput/train/tokens_per_s": 2000.4,
        "shallow/throughput/attack/gen_tokens_per_s": 300.0,
        "shallow/memory/train/rss_high_water_gib": 2.5,
        "shallow/memory/train/peak_cuda_gib": 10.125,
        "shallow/memory/attack/peak_cuda_gib": 3.0,
        "deep/asr/none": 0.5,
        "time/quickstart/margin_s": 22.0,
    }
    assert time_rows(metrics, ["unaligned", "shallow"]) == [
        ("harvest", "generate", 68.0, 120.34, None, "1.23"),
        ("shallow", "train", 50.2, None, 2000.4, "2.50 / 10.12"),
        ("shallow", "attack", 100.0, 300.0, None, "- / 3.00"),
        ("shallow", "utility", 20.0, None, None, None),
        ("margins", "first-token margin", 22.0, None, None, None),
    ]
    assert time_table(metrics, ["shallow"]) == [
        "| part | stage | seconds | generation tokens/s | training tokens/s | RSS high-water (GiB) |",
        "|---|---|---|---|---|---|",
        "| harvest | generate | 68 | 120.3 | - | 1.23 |",
        "| shallow | train | 50 | - | 2000 | 2.50 / 10.12 |",
        "| shallow | attack | 100 | 300.0 | - | - / 3.00 |",
        "| shallow | utility | 20 | - | - | - |",
        "| margins | first-token margin | 22 | - | - | - |",
        "| total | | 260 (4.3 min) | | | |",
    ]


def test_quickstart_stages_bench_reads_a_run_dir(tmp_path, monkeypatch, capsys):
    """bench/quickstart_stages.py prints the stage table and the speed table, memory column included."""
    metrics = {
        "time/quickstart/harvest_s": 68.0,
        "time/quickstart/shallow_s": 150.2,
        "shallow/time/train_s": 50.2,
        "shallow/time/attack_s": 100.0,
        "shallow/throughput/train/tokens_per_s": 2000.4,
        "shallow/memory/train/rss_high_water_gib": 2.5,
    }
    run_quickstart_stages(tmp_path, metrics, monkeypatch)
    out = capsys.readouterr().out
    assert "| shallow | train | 50 | - | 2000 | 2.50 |" in out
    assert "Total 3.6 min against a budget of 15 min: met." in out
