"""A Hydra multirun grid over beta on the tiny model: a run dir per point, one reference pass, comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deepalign.compare import main as compare_main


def test_two_by_two_grid_shares_one_reference_pass_and_compares(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps({"prompt": f"Say {w}.", "response": f"{w} {w}."}) + "\n"
            for w in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
        )
    )
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(
        "".join(
            json.dumps({"prompt": f"Request {i}.", "harmful": "Sure, here is one two three four five six."})
            + "\n"
            for i in range(3)
        )
    )
    cmd = [
        str(Path(sys.executable).parent / "deepalign"),
        "-m",
        "model=tiny",
        "logger=none",
        "stages=[train,attack]",
        "data=chat_file",
        f"data.components.chat.source={chats}",
        "loss=constrained",
        "train.max_steps=2",
        "train.per_device_batch_size=4",
        f"eval.prompts={evalset}",
        "attack=[prefill]",
        "attack.prefill.depths=[0,3]",
        "generation.max_new_tokens=4",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "loss.beta.prefix=1,2",
        "loss.beta.prefix_len=1,3",
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_SILENT": "true"}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted((tmp_path / "out" / "multirun").rglob("metrics.json"))
    assert len(runs) == 4
    hits = [json.loads(p.read_text())["train/reference_cache_hit"] for p in runs]
    assert sorted(hits) == [0, 1, 1, 1], "the grid computes the reference log-probs once"
    assert len(list((tmp_path / "cache" / "reference").glob("*.pt"))) == 1

    sweep = runs[0].parent.parent
    assert compare_main([str(sweep), "--metrics", "asr/*", "train/last_loss"]) == 0
    table = (sweep / "compare.md").read_text().splitlines()
    assert table[0].startswith("| run | loss.beta.prefix | loss.beta.prefix_len | asr/prefill/k=0")
    assert len(table) == 2 + 4
    assert (sweep / "compare.csv").read_text().count("\n") == 5
    for name in (
        "asr_vs_loss_beta_prefix.png",
        "asr_vs_loss_beta_prefix_len.png",
        "asr_vs_prefill_depth.png",
    ):
        assert (sweep / name).read_bytes()[:4] == b"\x89PNG"


FLAKY_STAGE = """\
from deepalign.plugins import register_stage


@register_stage("flaky")
def flaky(ctx):
    if ctx.config.seed == 1:
        raise RuntimeError("the flaky stage broke on seed 1")
    return {"flaky/seed": float(ctx.config.seed)}
"""


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`deepalign -m` with the stage `flaky` (fails on seed 1) from a plugin on PYTHONPATH."""
    (tmp_path / "flaky_stage.py").write_text(FLAKY_STAGE)
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(tmp_path)}
    cmd = [
        str(Path(sys.executable).parent / "deepalign"),
        "-m",
        "plugins=[flaky_stage]",
        "model=tiny",
        "logger=none",
        f"paths.output_dir={tmp_path / 'out'}",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_every_point_is_checked_before_the_first_one_runs(tmp_path):
    """Point 0 is fine; 1 has a bad setting, 2 a missing file, 3 both: nothing runs, each bad point named."""
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    out = sweep(
        tmp_path,
        "stages=[flaky,attack]",
        f"eval.prompts={tmp_path / 'eval.jsonl'},{tmp_path / 'missing.jsonl'}",
        "generation.top_p=0.5,1.5",
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines() == [
        f"deepalign: config error: sweep point #1 (eval.prompts={tmp_path}/eval.jsonl generation.top_p=1.5): "
        "generation.top_p: must be in (0, 1], got 1.5",
        f"deepalign: config error: sweep point #2 (eval.prompts={tmp_path}/missing.jsonl "
        f"generation.top_p=0.5): eval.prompts: no such file: {tmp_path}/missing.jsonl",
        f"deepalign: config error: sweep point #3 (eval.prompts={tmp_path}/missing.jsonl "
        "generation.top_p=1.5): generation.top_p: must be in (0, 1], got 1.5",
        "deepalign: 3 of 4 sweep points are invalid; nothing was run (fix them or leave them out of the "
        "sweep)",
    ]
    assert not (tmp_path / "out").exists()  # not even the sweep dir


def test_a_point_that_fails_as_it_runs_does_not_stop_the_others(tmp_path):
    out = sweep(tmp_path, "stages=[flaky]", "seed=0,1,2")
    assert out.returncode == 1, out.stderr[-3000:]
    runs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out").rglob("metrics.json")}
    assert {name: m["flaky/seed"] for name, m in runs.items()} == {"0": 0.0, "2": 2.0}
    (sweep_dir,) = (tmp_path / "out" / "multirun").glob("*/*")
    assert out.stderr.endswith(
        "deepalign: 1 of 3 sweep points failed:\n"
        f"  #1 seed=1 ({sweep_dir / '1'}): RuntimeError: the flaky stage broke on seed 1\n"
    ), out.stderr[-3000:]
    assert "RuntimeError: the flaky stage broke on seed 1\n" in out.stderr.split("deepalign: 1 of 3")[0]
