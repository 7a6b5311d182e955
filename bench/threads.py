"""Torch's CPU threads under load: a fixed piece of the quickstart's work (greedy generation and a training
step of the demo model, or the tiny model with --quick) timed alone and beside CPU-bound processes, with each
thread setting, every variant in a fresh child process.

    python bench/threads.py                  # demo model; 1 and 2 threads, OpenMP's ways of waiting
    python bench/threads.py --hogs 1 2       # beside 1 and beside 2 busy processes
    python bench/threads.py --quick          # the tiny random model

A busy process takes a core from a 2-thread torch process; each parallel op then waits for its slowest thread,
and OpenMP's threads spin while they wait (libgomp spins GOMP_SPINCOUNT iterations, 300,000 by default, before
sleeping; for ever with OMP_WAIT_POLICY=ACTIVE, not at all with PASSIVE), taking CPU from the very process
they wait for. The table gives each setting's seconds and its
slow-down against the same setting alone; a run that degrades in proportion to the CPU it gets is about 2x
beside one busy process on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, markdown_table  # noqa: E402

WORK = r"""
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from generation import load, prompts
from deepalign.chat import encode_for_generation
from deepalign.generation import GenerationRequest, HFEngine, SamplingParams
torch.set_num_threads({threads})
loaded = load({model!r})
model, tok = loaded.model, loaded.tokenizer
ids = [encode_for_generation(tok, p) for p in prompts({prompts})]
requests = [GenerationRequest(str(i), x, SamplingParams(max_new_tokens={new})) for i, x in enumerate(ids)]
engine = HFEngine(model, tok, batch_size={prompts}, progress=False)
list(engine.generate(requests[:2]))  # warm-up
start = time.perf_counter()
list(engine.generate(requests))
generate = time.perf_counter() - start
batch = torch.tensor([x[:24] + [0] * (24 - len(x[:24])) for x in ids[:8]])
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
model.train()
start = time.perf_counter()
for _ in range({steps}):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
train = time.perf_counter() - start
print(json.dumps({{"generate": generate, "train": train}}))
"""

HOG = "while True: pass"


def measure(env: dict[str, str], args, threads: int, hogs: int) -> dict[str, float]:
    code = WORK.format(
        bench=str(Path(__file__).resolve().parent),
        threads=threads,
        model=args.model,
        prompts=args.prompts,
        new=args.max_new_tokens,
        steps=args.steps,
    )
    busy = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m_instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hogs", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["default", "OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=10000", "OMP_WAIT_POLICY=ACTIVE"],
        help="OpenMP environment settings for 2+ threads (default: the environment as it is, both unset)",
    )
    parser.add_argument("--quick", action="store_true", help="the tiny random model, 8 prompts")
    args = parser.parse_args()
    if args.quick:
        args.model, args.prompts, args.max_new_tokens, args.steps = "tiny", 8, 8, 2
    rows = []
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for threads in args.threads:
        for setting in args.settings if threads > 1 else ["default"]:
            env = dict(base)
            if setting != "default":
                key, _, value = setting.partition("=")
                env[key] = value
            alone = measure(env, args, threads, 0)
            for hogs in [0, *args.hogs]:
                got = alone if hogs == 0 else measure(env, args, threads, hogs)
                row = [threads, setting, hogs]
                for part in ("generate", "train"):
                    row += [f"{got[part]:.1f}", f"{got[part] / alone[part]:.2f}x"]
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    print(
        f"model={args.model}, {args.prompts} prompts x {args.max_new_tokens} new tokens, "
        f"{args.steps} training "
        f"steps; {machine_line()}\n"
    )
    header = [
        "threads",
        "OMP_WAIT_POLICY",
        "busy processes beside",
        "generate (s)",
        "vs alone",
        "train (s)",
        "vs alone",
    ]
    print(markdown_table(header, rows))
    print(
        f"\n{time.strftime('%Y-%m-%d')}: a setting that degrades in proportion to the CPU it gets is about "
        "2x beside one busy process on 2 cores."
    )


if __name__ == "__main__":
    main()
