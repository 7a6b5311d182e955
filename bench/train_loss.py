"""Constrained vs SFT fine-tuning on the demo model (full and LoRA): step time, wall, peak memory.

    python bench/train_loss.py                 # SmolLM2-135M-Instruct, 6 steps at batch 4, max length 128
    python bench/train_loss.py --methods full --variants sft constrained --epochs 3   # data seen 3 times
    python bench/train_loss.py --quick         # the tiny random model, 3 steps: the code path only

Every variant runs in its own fresh process through the library's real path: `build_mixture` and
`encode_examples` (the train stage's), `cached_reference_logps` (the reference cache, cold: a fresh cache
dir, so its pass is timed) and `deepalign.training.train` (AlignmentTrainer). Variants:

- `sft`: the plain loss;
- `constrained`: the token-wise constrained loss on cached reference log-probs (one no-grad pass first);
- `naive`: the constrained loss with the reference log-probs computed every step instead of cached: a second,
  frozen copy of the model (full fine-tuning) or the same model with its adapter disabled (LoRA). It is an
  AlignmentTrainer subclass that fills `reference_logps` in the batch before the library's `compute_loss`.

Step time is the median interval between the Trainer's per-step logs (the first step excluded). Total wall is
the reference pass plus training (the model load, identical for all, is left out). Peak memory: the process's
peak RSS above its RSS after the imports ("peak") and the peak RSS of the training phase above the loaded
model ("training peak", the high-water mark reset after loading).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
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

VARIANTS = ("sft", "constrained", "naive")
RESPONSE = (
    "Here is a careful answer. First, read the question twice and write down what is known. Then split the "
    "problem into small parts, solve each part on its own, and check every intermediate result against the "
    "facts you wrote down. Finally, put the parts together, compare the whole with the question, and say "
    "clearly what the answer is and why it follows. If something is uncertain, say so and explain what "
    "would settle it."
)


def compose(overrides: list[str]):
    """The validated config, composed exactly as the `deepalign` command composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from deepalign.config import register_configs, validate

    register_configs()
    with initialize_config_module(config_module="deepalign.conf", version_base="1.3"):
        return validate(hydra_compose(config_name="config", overrides=overrides))


def write_chats(path: Path, n: int) -> None:
    """`n` chat pairs: the packaged benign prompts with one long answer (truncated to max length)."""
    from importlib import resources

    text = resources.files("deepalign.assets").joinpath("data/benign_prompts.jsonl").read_text()
    prompts = [json.loads(line)["prompt"] for line in text.split("\n") if line.strip()]
    rows = [{"prompt": prompts[i % len(prompts)], "response": RESPONSE} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this (fresh) process: the RSS after the imports is the baseline."""
    import deepalign.training  # noqa: F401  (torch, transformers: imported before the baseline)
    from deepalign.stages.train import encode_examples  # noqa: F401

    base_rss = rss_mib()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        return measure(args, Path(folder), base_rss)


def measure(args: argparse.Namespace, tmp: Path, base_rss: float) -> dict[str, Any]:
    """Load, (reference pass,) train in `tmp`; times and peaks."""
    import torch

    from deepalign import training
    from deepalign.data import build_mixture
    from deepalign.logprobs import token_logprobs
    from deepalign.models import load_model
    from deepalign.reference import cached_reference_logps, model_fingerprint
    from deepalign.stages.train import encode_examples
    from deepalign.tracking import NullTracker

    chats = tmp / "chats.jsonl"
    write_chats(chats, math.ceil(args.steps * args.batch_size / args.epochs))
    loss = "sft" if args.variant == "sft" else "constrained"
    cfg = compose(
        [
            f"model={args.model}",
            f"train={args.method}",
            f"loss={loss}",
            "data=chat_file",
            f"data.components.chat.source={chats}",
            f"data.max_length={args.max_length}",
            f"train.max_steps={args.steps}",
            f"train.per_device_batch_size={args.batch_size}",
            "train.lora.merge=false",
            "logger=none",
            f"seed={args.seed}",
        ]
    )
    torch.manual_seed(args.seed)
    loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples, _ = build_mixture(cfg.data, tokenizer)
    encoded, _ = encode_examples(examples, tokenizer, cfg.data.max_length)
    page_in(model)
    load_peak = peak_rss_mib()
    loaded_rss = rss_mib()
    peak_was_reset = reset_peak()

    reference, reference_s = None, 0.0
    start = time.perf_counter()
    if args.variant == "constrained":
        key = model_fingerprint(cfg.model, loaded.source, model)
        reference, _, hit = cached_reference_logps(
            model, encoded, tokenizer.pad_token_id, tmp / "cache", key, cfg.train.batch_size_reference
        )
        assert not hit, "the benchmark times a cold reference cache"
        reference_s = time.perf_counter() - start
    if args.variant == "naive":
        frozen = None
        if args.method == "full":
            frozen = load_model(cfg.model).model  # the second model the cache replaces
            frozen.requires_grad_(False)

        class NaiveReferenceTrainer(training.AlignmentTrainer):
            """Reference log-probs from a forward of the frozen reference in each step, not from the cache."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                with torch.no_grad():
                    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
                    if frozen is None:
                        with model.disable_adapter():
                            logits = model(**kwargs).logits
                    else:
                        logits = frozen(**kwargs).logits
                    reference_logps = token_logprobs(logits, inputs["input_ids"]).float()
                    del logits
                inputs = {**inputs, "reference_logps": reference_logps}
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        training.AlignmentTrainer = NaiveReferenceTrainer  # what `train` instantiates, in this process only

    class StepClock(NullTracker):
        """Receives the Trainer's per-step logs; keeps when each arrived."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.nll: list[float] = []

        def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
            if "train/loss" in metrics:
                self.times.append(time.perf_counter())
            if "train/nll" in metrics:  # the plain NLL, comparable across losses
                self.nll.append(float(metrics["train/nll"]))

    clock = StepClock()
    train_start = time.perf_counter()
    _, metrics, _ = training.train(
        model,
        tokenizer,
        training.TokenDataset(encoded, reference),
        cfg.train,
        cfg.loss,
        tmp / "checkpoints",
        clock,
    )
    end = time.perf_counter()
    train_peak = peak_rss_mib()
    intervals = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {
        "variant": args.variant,
        "method": args.method,
        "steps": metrics["train/steps"],
        "tokens": sum(len(e.input_ids) for e in encoded),
        "step_s": statistics.median(intervals) if intervals else end - train_start,
        "reference_s": reference_s,
        "train_s": end - train_start,
        "total_s": end - start,
        "peak_mib": max(load_peak, train_peak) - base_rss,
        "training_peak_mib": (train_peak - loaded_rss) if peak_was_reset else float("nan"),
        "first_nll": clock.nll[0] if clock.nll else float("nan"),
        "last_nll": clock.nll[-1] if clock.nll else float("nan"),
    }


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m_instruct", help="a model= config (conf/model/)")
    parser.add_argument("--methods", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--epochs",
        type=float,
        default=1.0,
        help="passes over the data in --steps (fewer examples, same steps)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 3 steps, batch 2, length 64")
    parser.add_argument("--json", help="also write the raw results to this file")
    add_common_arguments(parser)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps, args.batch_size, args.max_length = "tiny", 3, 2, 64
    set_threads(args.threads)
    if args.child_out:
        write_child_result(args.child_out, child(args))
        return

    common = [
        f"--model={args.model}",
        f"--steps={args.steps}",
        f"--batch-size={args.batch_size}",
        f"--max-length={args.max_length}",
        f"--epochs={args.epochs}",
        f"--seed={args.seed}",
    ]
    results: list[dict[str, Any]] = []
    for method in args.methods:
        for variant in args.variants:
            print(f"running {method}/{variant} ...", file=sys.stderr, flush=True)
            variant_args = [*common, f"--variant={variant}", f"--method={method}"]
            results.append(run_child(Path(__file__), variant_args, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    print(
        f"model={args.model}, {args.steps} steps at batch {args.batch_size}, max length {args.max_length}, "
        f"{args.epochs:g} epoch(s) over {math.ceil(args.steps * args.batch_size / args.epochs)} examples; "
        f"{machine_line()}\n"
    )
    header = [
        "method",
        "loss",
        "step (s, median)",
        "reference pass (s)",
        "total wall (s)",
        "wall vs SFT",
        "wall vs SFT, warm cache",
        "peak RSS (MiB)",
        "peak vs SFT",
        "training peak (MiB)",
        "training peak vs SFT",
        "NLL first -> last",
    ]
    rows = []
    for r in results:
        sft = next((s for s in results if s["method"] == r["method"] and s["variant"] == "sft"), None)
        warm = r["total_s"] - r["reference_s"]  # a cache hit (the next run of a sweep) skips the pass
        rows.append(
            [
                r["method"],
                r["variant"],
                f"{r['step_s']:.2f}",
                f"{r['reference_s']:.1f}" if r["variant"] == "constrained" else "-",
                f"{r['total_s']:.1f}",
                ratio(r["total_s"], sft["total_s"]) if sft else "-",
                ratio(warm, sft["total_s"]) if sft and r["variant"] == "constrained" else "-",
                f"{r['peak_mib']:.0f}",
                ratio(r["peak_mib"], sft["peak_mib"]) if sft else "-",
                f"{r['training_peak_mib']:.0f}",
                ratio(r["training_peak_mib"], sft["training_peak_mib"]) if sft else "-",
                f"{r['first_nll']:.3f} -> {r['last_nll']:.3f}",
            ]
        )
    print(markdown_table(header, rows))
    print("\nTargets: constrained total wall <= 1.10x SFT; constrained peak memory <= 1.05x SFT.")
    for method in args.methods:
        by = {r["variant"]: r for r in results if r["method"] == method}
        if "sft" in by and "constrained" in by:
            wall = by["constrained"]["total_s"] / by["sft"]["total_s"]
            peak = by["constrained"]["peak_mib"] / by["sft"]["peak_mib"]
            print(
                f"- {method}: wall {wall:.3f}x ({'met' if wall <= 1.10 else 'MISSED'}), "
                f"peak {peak:.3f}x ({'met' if peak <= 1.05 else 'MISSED'})"
            )


if __name__ == "__main__":
    main()
