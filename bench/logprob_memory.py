"""Peak memory of per-token log-probs at a large vocabulary: the model's full logits (`chunk_mib=0`, the path
before chunking) vs the chunked output layer (`deepalign.logprobs.target_logprobs`), with equal values.

    python bench/logprob_memory.py                    # vocabulary 256000 (Gemma's), batch 2 x 1024 tokens
    python bench/logprob_memory.py --quick            # vocabulary 32000, batch 2 x 256: seconds
    python bench/logprob_memory.py --device cuda      # on a GPU: torch.cuda.max_memory_allocated, bf16

Two phases, each variant in a fresh process: `train` (forward, log-probs of the target tokens, backward: the
policy's step) and `reference` (the same under no_grad: the reference pass and the per-token KL). The model is
a small random Llama (hidden 64, 2 layers) with the full vocabulary, so the logits dominate as they do in a
real micro-batch; the second half of each sequence is the target (the response). On the CPU the peak is the
RSS high-water mark above the RSS with the model loaded (glibc's mmap threshold fixed at 1 MiB, so freed
tensors go back to the system: see bench/kl_memory.py); on a GPU, max_memory_allocated above the loaded model.
Values: the largest |difference| of the target log-probs and of the gradients, each variant against chunk 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MIB,
    add_common_arguments,
    machine_line,
    markdown_table,
    peak_rss_mib,
    reset_peak,
    rss_mib,
    run_child,
    set_threads,
    write_child_result,
)


def build(vocab: int, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from deepalign.logprobs import target_logprobs

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build(args.vocab, args.device, dtype)
    model.train(args.phase == "train")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(args.device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, args.seq // 2 :] = True
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_mib()
        reset_peak()
    start = time.perf_counter()
    with torch.set_grad_enabled(args.phase == "train"):
        logps, _ = target_logprobs(model, ids, target_mask=mask, chunk_mib=args.chunk_mib)
        if args.phase == "train":
            logps[mask].sum().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / MIB
    else:
        peak = peak_rss_mib() - base
    seconds = time.perf_counter() - start
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"logps": logps[mask].detach().float().cpu(), "grads": grads}, args.values_out)
    return {"peak_mib": peak, "seconds": seconds}


def compare(a: Path, b: Path) -> tuple[float, float | None]:
    import torch

    x, y = torch.load(a), torch.load(b)
    values = float((x["logps"] - y["logps"]).abs().max())
    if not x["grads"]:
        return values, None
    grads = max(float((x["grads"][n] - y["grads"][n]).abs().max()) for n in x["grads"])
    return values, grads


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunks", type=float, nargs="+", default=[0, 256, 128, 64], help="chunk_mib values")
    parser.add_argument("--phases", nargs="+", default=["train", "reference"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="vocabulary 32000, batch 2 x 256")
    add_common_arguments(parser)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-mib", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--values-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.seq, args.chunks = 32_000, 256, [0, 16, 4]
    set_threads(args.threads)
    if args.child_out:
        write_child_result(args.child_out, child(args))
        return
    if 0 not in args.chunks:
        args.chunks = [0, *args.chunks]

    malloc = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    shape = [f"--vocab={args.vocab}", f"--batch={args.batch}", f"--seq={args.seq}", f"--device={args.device}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for phase in args.phases:
            results = {}
            for chunk in args.chunks:
                print(f"running {phase} chunk_mib={chunk:g} ...", file=sys.stderr, flush=True)
                out = Path(tmp) / f"{phase}-{chunk:g}.pt"
                extra = [f"--phase={phase}", f"--chunk-mib={chunk}", f"--values-out={out}"]
                results[chunk] = (run_child(Path(__file__), [*shape, *extra], args.threads, malloc), out)
            full = results[0][0]["peak_mib"]
            for chunk, (r, out) in results.items():
                values, grads = compare(out, results[0][1])
                rows.append(
                    [
                        phase,
                        "full logits (before)" if chunk == 0 else f"chunked, {chunk:g} MiB",
                        f"{r['peak_mib']:.0f}",
                        f"{r['peak_mib'] / full:.3f}",
                        f"{r['seconds']:.2f}",
                        f"{values:.1e}",
                        "-" if grads is None else f"{grads:.1e}",
                    ]
                )
    logits_mib = args.batch * args.seq * args.vocab * 4 / MIB
    print(
        f"vocabulary {args.vocab}, batch {args.batch} x {args.seq} tokens (targets: the second half), "
        f"fp32 logits of the batch {logits_mib:.0f} MiB; device {args.device}; {machine_line()}\n"
    )
    header = ["phase", "log-probs", "peak (MiB)", "vs full logits", "time (s)", "max |dlogp|", "max |dgrad|"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
