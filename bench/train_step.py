"""One optimizer step of the quickstart's training on the demo model: attention implementation, micro-batches
and optimizer kernel, each variant in a fresh child process (its own peak RSS).

    python bench/train_step.py                # demo model, the precision `train.bf16=auto` picks here
    python bench/train_step.py --bf16 false   # fp32 (on a CPU with AMX, also try ONEDNN_MAX_CPU_ISA=AVX2)
    python bench/train_step.py --quick        # the tiny random model, 2 steps

A step is 8 sequences of the quickstart's lengths (60-130 tokens, seeded), loss on their second half, as
the train stage computes it: the chunked target log-probs (`deepalign.logprobs.target_logprobs`), backward,
gradient clipping, the optimizer. `4 x 2` runs the 8 sequences as two micro-batches of 4 with gradient
accumulation (the same gradient: the loss is normalised over the step's target tokens), each padded to its own
longest. Seconds per step: the median of `--steps` after one warm-up step; tokens/s count non-padding tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_common_arguments,
    machine_line,
    markdown_table,
    peak_rss_mib,
    run_child,
    set_threads,
    write_child_result,
)

VARIANTS = [  # (attention, micro-batches, fused AdamW)
    ("sdpa", 1, False),
    ("sdpa", 1, True),
    ("eager", 1, True),
    ("sdpa", 2, True),
    ("eager", 2, True),
]


def batches(vocab: int, seed: int = 0) -> list[list[int]]:
    """8 token sequences of the quickstart's training lengths."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(60, 131, (8,), generator=g).tolist()
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


def child(args: argparse.Namespace) -> None:
    import torch
    from generation import load

    from deepalign.logprobs import pad_batch, target_logprobs

    set_threads(args.threads)
    loaded = load(args.model)
    model = loaded.model
    model.set_attn_implementation(args.attention)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=args.fused)
    seqs = batches(model.config.vocab_size)
    masks = [[i >= len(s) // 2 for i in range(len(s))] for s in seqs]
    n_tokens = sum(sum(m) for m in masks)
    size = len(seqs) // args.micro

    def step() -> None:
        for start in range(0, len(seqs), size):
            padded = pad_batch(seqs[start : start + size], 0, labels_masks=masks[start : start + size])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logps, _ = target_logprobs(
                    model,
                    padded.input_ids,
                    attention_mask=padded.attention_mask,
                    target_mask=padded.labels_mask,
                )
            (-(logps[padded.labels_mask]).sum() / n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    tokens = sum(len(s) for s in seqs)
    write_child_result(
        args.child_out, {"seconds": median, "tokens_per_s": tokens / median, "peak_mib": peak_rss_mib()}
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m_instruct", help="a model= config (conf/model/)")
    parser.add_argument("--bf16", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="the tiny random model, 2 steps")
    parser.add_argument("--attention", help=argparse.SUPPRESS)
    parser.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    add_common_arguments(parser)
    parser.set_defaults(threads=2)
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps = "tiny", 2
    if args.child_out:
        args.bf16 = args.bf16 == "true"
        child(args)
        return
    if args.bf16 == "auto":
        from deepalign.precision import train_bf16

        args.bf16 = "true" if train_bf16("auto", "cpu") else "false"
    set_threads(args.threads)
    print(machine_line())
    rows = []
    for attention, micro, fused in VARIANTS:
        extra = ["--fused"] if fused else []
        result = run_child(
            Path(__file__),
            [
                "--model",
                args.model,
                "--bf16",
                args.bf16,
                "--steps",
                str(args.steps),
                "--attention",
                attention,
                "--micro",
                str(micro),
                *extra,
            ],
            args.threads,
        )
        rows.append(
            [
                attention,
                f"{8 // micro} x {micro}",
                "fused" if fused else "for-each",
                f"{result['seconds']:.2f}",
                f"{result['tokens_per_s']:.0f}",
                f"{result['peak_mib'] / 1024:.2f}",
            ]
        )
    precision = "bf16 autocast" if args.bf16 == "true" else "fp32"
    print(f"\nOne step of 8 sequences (60-130 tokens), {precision}, median of {args.steps}:\n")
    print(
        markdown_table(
            ["attention", "micro-batches", "AdamW", "s / step", "tokens/s", "peak RSS (GiB)"], rows
        )
    )


if __name__ == "__main__":
    main()
