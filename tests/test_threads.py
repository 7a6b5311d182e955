"""Thread settings that hold up beside other busy processes (bench/threads.py measures them)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_openmp_threads_spin_briefly_unless_told_otherwise():
    """Importing deepalign (before torch) sets libgomp's spin count; a value the user set stays."""
    code = "import os, deepalign, torch; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
        == "10000\n"
    )
    env["GOMP_SPINCOUNT"] = "5"
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "5\n"
    )
