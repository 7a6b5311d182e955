"""bench/gpu_session.sh, the script a lent GPU machine runs, dry-run on a CPU: every step of both parts
(gpu_check variants, the 7B path, log-prob memory, the entrypoint under torchrun with ZeRO-2 and ZeRO-3,
the quickstart) at toy sizes, and $OUT holds exactly the summary and the log archive."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

from conftest import REPO

STEPS = [
    "check_1b_before",
    "check_1b",
    "check_1b_compiled",
    "check_7b",
    "logprob_memory",
    "torchrun_zero2",
    "torchrun_zero3",
    "quickstart",
]


def test_the_gpu_session_runs_every_step_on_a_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(out), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_session.sh"), "perf", "demo"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.md"]
    summary = (out / "summary.md").read_text()
    codes = dict(re.findall(r"^## (\w+): rc=(\d+),", summary, flags=re.M))
    assert codes == {name: "0" for name in STEPS}, summary[-3000:]
    assert "same tokens as the first: yes" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"check_1b.json", "check_7b.json", "zero2_metrics.json", "zero3_metrics.json"} <= names
    assert "quickstart_report.md" in names
