"""Peak memory of per-token KL (deepalign.kl.per_token_kl, streaming) vs keeping every logit, as n grows.

    python bench/kl_memory.py                  # the tiny random model (vocabulary 49152), n = 16, 64, 256
    python bench/kl_memory.py --model smollm2_135m_instruct --sizes 16 64     # the demo model (slower)
    python bench/kl_memory.py --quick          # n = 8 and 32

`per_token_kl` runs the two models batch by batch and keeps only per-position sums, so its peak memory is set
by one batch's logits (batch x sequence x vocabulary) whatever the number of pairs. The comparison keeps the
full logits of both models for all pairs (n x sequence x 49152 floats each), then computes the same KL: what
dumping logits to analyse later costs. Each (method, n) runs in a fresh process; the peak is the RSS
high-water mark during the KL computation above the RSS with both models loaded. The dump is run up to
`--dump-max` pairs; beyond, its logits' size is computed, not measured.

Both memory figures are dominated by logits (batch or n, x sequence x vocabulary), so the default model is the
tiny random Llama with the real 49152-token vocabulary (the demo model adds little per batch but takes ~6 s
a batch on 2 cores). The children run with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), so
a freed tensor goes back to the system and the peak measures live tensors; glibc's default (a threshold that
grows up to 32 MiB as large blocks are freed) leaves fragmented heap behind and makes the streaming peak
jump between runs (bounded, but up to ~2x the one-batch peak): `--default-malloc` shows that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MIB,
    add_common_arguments,
    machine_line,
    markdown_table,
    page_in,
    peak_rss_mib,
    reset_peak,
    rss_mib,
    run_child,
    set_threads,
    write_child_result,
)

RESPONSE = (
    "Sure, here is a short plan. Start with the basics, then add one detail at a time, checking each step "
    "before moving on, and write down what worked and what did not."
)


def pairs(n: int) -> list[tuple[str, str]]:
    text = resources.files("deepalign.assets").joinpath("data/benign_prompts.jsonl").read_text()
    rows = [json.loads(line)["prompt"] for line in text.split("\n") if line.strip()]
    return [(rows[i % len(rows)], RESPONSE) for i in range(n)]


def dump_then_kl(model, reference, tokenizer, data, positions: int, batch_size: int) -> list[float]:
    """The alternative: every logit of both models kept (as a dump would), the mean KL per position after."""
    import torch
    import torch.nn.functional as F

    from deepalign.chat import encode_for_training
    from deepalign.kl import response_index
    from deepalign.logprobs import pad_sequences

    encoded = [encode_for_training(tokenizer, p, r) for p, r in data]
    kept = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            ids = pad_sequences([e.input_ids for e in batch], tokenizer.pad_token_id)
            attention = pad_sequences([[1] * len(e.input_ids) for e in batch], 0)
            kept.append(
                (
                    model(input_ids=ids, attention_mask=attention).logits.float(),
                    reference(input_ids=ids, attention_mask=attention).logits.float(),
                    [response_index(e.labels_mask, positions) for e in batch],
                )
            )
        sums, counts = [0.0] * positions, [0] * positions
        for logits, ref_logits, rows in kept:
            for b, row in enumerate(rows):
                for k, i in enumerate(row):
                    logp = F.log_softmax(logits[b, i - 1], -1)
                    logq = F.log_softmax(ref_logits[b, i - 1], -1)
                    sums[k] += float((logp.exp() * (logp - logq)).sum())
                    counts[k] += 1
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from hydra import compose, initialize_config_module

    from deepalign.chat import encode_for_training
    from deepalign.config import register_configs, validate
    from deepalign.kl import per_token_kl
    from deepalign.models import load_model

    register_configs()
    with initialize_config_module(config_module="deepalign.conf", version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=[f"model={args.model}", "logger=none"]))
    model = load_model(cfg.model)
    reference = load_model(cfg.model).model
    with torch.no_grad():  # a slightly different policy, so the KL is not zero
        generator = torch.Generator().manual_seed(0)
        for p in model.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
    data = pairs(args.n)
    seq = max(len(encode_for_training(model.tokenizer, p, r).input_ids) for p, r in data)
    page_in(model.model, reference)
    loaded = rss_mib()
    reset_peak()
    start = time.perf_counter()
    if args.method == "stream":
        stats = per_token_kl(
            model.model, reference, model.tokenizer, data, args.positions, args.batch_size, progress=False
        )
        mean = stats.mean
    else:
        mean = dump_then_kl(model.model, reference, model.tokenizer, data, args.positions, args.batch_size)
    seconds = time.perf_counter() - start
    vocab = model.model.config.vocab_size
    return {
        "method": args.method,
        "n": args.n,
        "seq": seq,
        "vocab": vocab,
        "peak_mib": peak_rss_mib() - loaded,
        "seconds": seconds,
        "kl_pos1": mean[0],
        "kl_mean": sum(mean) / len(mean),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="a model= config (conf/model/)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--dump-max", type=int, default=64, help="largest n for which the dump is run")
    parser.add_argument("--positions", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's mmap threshold alone")
    parser.add_argument("--quick", action="store_true", help="n = 8 and 32")
    add_common_arguments(parser)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.sizes, args.dump_max = "tiny", [8, 32], 32
    set_threads(args.threads)
    if args.child_out:
        write_child_result(args.child_out, child(args))
        return

    common = [f"--model={args.model}", f"--positions={args.positions}", f"--batch-size={args.batch_size}"]
    malloc = {} if args.default_malloc else {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for n in args.sizes:
        for method in ("stream", "dump"):
            if method == "dump" and n > args.dump_max:
                continue
            print(f"running {method} n={n} ...", file=sys.stderr, flush=True)
            results[method, n] = run_child(
                Path(__file__), [*common, f"--method={method}", f"--n={n}"], args.threads, malloc
            )

    allocator = "glibc default malloc" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=1 MiB"
    print(
        f"model={args.model} vs a perturbed copy, batch {args.batch_size}, {args.positions} positions, "
        f"{allocator}; {machine_line()}\n"
    )
    rows = []
    first = results["stream", args.sizes[0]]["peak_mib"]
    for n in args.sizes:
        s = results["stream", n]
        logits_mib = 2 * n * s["seq"] * s["vocab"] * 4 / MIB  # both models' full logits, float32
        d = results.get(("dump", n))
        rows.append(
            [
                n,
                s["seq"],
                f"{s['peak_mib']:.0f}",
                f"{s['peak_mib'] / first:.2f}x",
                f"{s['seconds']:.1f}",
                f"{d['peak_mib']:.0f}" if d else "not run",
                f"{logits_mib:.0f}",
                f"{d['peak_mib'] / s['peak_mib']:.1f}x" if d else f">= {logits_mib / s['peak_mib']:.1f}x",
                f"{s['kl_pos1']:.2e}" + (f" / {d['kl_pos1']:.2e}" if d else ""),
            ]
        )
    header = [
        "pairs n",
        "max seq",
        "streaming peak (MiB)",
        "vs smallest n",
        "streaming (s)",
        "dump peak (MiB)",
        "full logits, 2 models (MiB)",
        "dump vs streaming",
        "KL at pos 1 (stream / dump)",
    ]
    print(markdown_table(header, rows))
    growth = results["stream", args.sizes[-1]]["peak_mib"] / first
    print(
        f"\nStreaming peak from n={args.sizes[0]} to n={args.sizes[-1]}: {growth:.2f}x "
        f"({'flat' if growth <= 1.25 else 'NOT flat'}; the dump grows linearly with n)."
    )


if __name__ == "__main__":
    main()
