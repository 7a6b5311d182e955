"""deepalign: measure, attack, deepen and protect how deep a language model's safety alignment goes."""

import os

__version__ = "0.1.0"

# OpenMP's idle threads spin 300,000 iterations (libgomp's default) before they sleep: beside another busy
# process each parallel op then waits for a thread that spins on the core it needs, and a 2-thread run on
# 2 cores took 5-7x as long as alone. 10,000 keeps the speed alone and about 2x beside one busy process
# (bench/threads.py). Read when torch loads libgomp, so set before torch is imported; a value set stays.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
