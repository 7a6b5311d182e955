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
