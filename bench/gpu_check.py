"""GPU check: a Llama built from a config (no download; ~1.1B by default, `--preset 7b` for the 7B shape)
trained for a few bf16 steps with the token-wise constrained loss under DeepSpeed ZeRO-2, then greedy
generation with the dynamic and the static (compiled) KV cache; prints a table of training tokens/s, MFU,
peak memory and generation tokens/s per cache, and whether both caches give the same tokens.

    python bench/gpu_check.py                        # one CUDA GPU, the 1.1B shape (a minute on an H100)
    python bench/gpu_check.py --preset 7b            # the 7B shape: activation checkpointing, ZeRO-2
    python bench/gpu_check.py --preset 7b --offload-optimizer   # ... with the optimizer state in CPU memory
    python bench/gpu_check.py --logprob-chunk-mib 0 --no-fused-adamw --gen-caches dynamic  # the old path
    python bench/gpu_check.py --dry-run              # CPU, tiny model, plain torch AdamW: the code path only

The training log-probs come from the library's `target_logprobs` (the output layer a chunk of tokens at a
time, `--logprob-chunk-mib`, 0 for the model's full logits). `--compile` compiles each decoder layer
(torch.compile). MFU = 6 * N * training tokens/s / peak bf16 FLOP/s, with N all parameters (attention's own
FLOPs and activation recomputation are not counted, so this understates the hardware's real utilisation).
The peak comes from the GPU's name (dense bf16, no sparsity) or --peak-tflops. Data are random tokens; the
reference log-probs of the constrained loss are one fixed fake tensor (the real run caches them from the
aligned model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

from deepalign.generation import KeptStaticCache
from deepalign.logprobs import LOGPROB_CHUNK_MIB, cache_kwarg, target_logprobs
from deepalign.losses import beta_schedule, betas_for_mask, constrained_token_loss

# Dense bf16 tensor-core peak per GPU, by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)

GEN_TIMED_CALLS = 3  # timed generate calls per KV cache after the first (untimed, compiling) one

# --dry-run: a tiny model and workload (hidden 64, 2 layers) so that the whole path runs on a CPU in seconds.
DRY_RUN_SIZES: dict[str, int] = {
    "hidden": 64,
    "intermediate": 128,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "vocab": 512,
    "batch_size": 2,
    "seq_len": 32,
    "steps": 2,
    "warmup_steps": 1,
    "gen_batch": 4,
    "gen_prompt_len": 8,
    "gen_new_tokens": 8,
}

# --preset: the model and workload shapes (flags given explicitly still win over these)
PRESETS: dict[str, dict[str, int | bool]] = {
    # TinyLlama-1.1B's shape
    "1b": {
        "hidden": 2048,
        "intermediate": 5632,
        "layers": 22,
        "heads": 32,
        "kv_heads": 4,
        "vocab": 32000,
        "batch_size": 8,
        "seq_len": 1024,
        "checkpointing": False,
    },
    # Llama-2-7B's shape; activation checkpointing keeps the activations of batch 4 x 1024 small
    "7b": {
        "hidden": 4096,
        "intermediate": 11008,
        "layers": 32,
        "heads": 32,
        "kv_heads": 32,
        "vocab": 32000,
        "batch_size": 4,
        "seq_len": 1024,
        "steps": 6,
        "warmup_steps": 2,
        "gen_batch": 16,
        "checkpointing": True,
    },
}


@dataclass
class Shape:
    """The model and workload sizes of one check."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch_size: int
    seq_len: int
    steps: int
    warmup_steps: int
    gen_batch: int
    gen_prompt_len: int
    gen_new_tokens: int
    checkpointing: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, a tiny model, plain torch AdamW (no DeepSpeed)"
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b", help="model and workload shape")
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per training step")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, help="activation checkpointing")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (kernels, allocator)")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--gen-prompt-len", type=int, default=128)
    p.add_argument("--gen-new-tokens", type=int, default=128)
    p.add_argument(
        "--gen-caches",
        nargs="+",
        default=["dynamic", "static"],
        help="KV caches to time (the first: baseline)",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--logprob-chunk-mib",
        type=float,
        default=LOGPROB_CHUNK_MIB,
        help="MiB of fp32 logits scored at a time (0: the model's full logits)",
    )
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True, help="on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--offload-optimizer", action="store_true", help="ZeRO-2 optimizer state in CPU memory")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s (default: by GPU name)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    p.set_defaults(**PRESETS[args.preset])
    if args.dry_run:  # a few seconds on a CPU; flags given explicitly still win over these sizes
        p.set_defaults(**DRY_RUN_SIZES, checkpointing=args.preset == "7b")
    return p.parse_args(argv)


def shape_from(args: argparse.Namespace) -> Shape:
    return Shape(
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        gen_batch=args.gen_batch,
        gen_prompt_len=args.gen_prompt_len,
        gen_new_tokens=args.gen_new_tokens,
        checkpointing=args.checkpointing,
    )


def build_model(shape: Shape, dtype: torch.dtype, device: torch.device):
    """A randomly initialised Llama of the given shape (transformers LlamaConfig; nothing is downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(shape.seq_len, shape.gen_prompt_len + shape.gen_new_tokens),
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    if shape.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(dtype)


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """Peak bf16 FLOP/s and where the figure comes from."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{key} table"
    return None, f"unknown GPU {name!r} (pass --peak-tflops)"


def zero2_config(batch_size: int, hidden: int, offload_optimizer: bool = False) -> dict[str, Any]:
    """The repo's launchers/zero2.json, its "auto" values (the Trainer fills them in real runs) set here;
    `offload_optimizer`: the optimizer state and step in CPU memory (a torch optimizer, no compiled op)."""
    from deepalign.training import deepspeed_config

    path = deepspeed_config("zero2")
    assert path is not None
    with open(path) as f:
        config = json.load(f)
    values = {
        "bf16.enabled": True,
        "fp16.enabled": False,
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size,
    }

    def fill(node: dict[str, Any], prefix: str = "") -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                fill(value, f"{dotted}.")
            elif value == "auto":
                if dotted not in values:
                    raise ValueError(f"{path}: no value for the 'auto' setting {dotted}")
                node[key] = values[dotted]

    fill(config)
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the CPU partitions
    return config


def init_single_process_group() -> None:
    """DeepSpeed wants a process group even on one GPU: rank 0 of 1, on a free local port."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")


class Stepper:
    """One optimizer step on a loss: DeepSpeed's engine (backward / step), or plain torch AdamW."""

    def __init__(self, model, args: argparse.Namespace, shape: Shape, use_deepspeed: bool) -> None:
        fused = args.fused_adamw and use_deepspeed and not args.offload_optimizer  # CUDA tensors only
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused or None
        )
        self.optimizer_name = f"torch AdamW{' (fused)' if fused else ''}"
        self.engine = None
        if use_deepspeed:
            import deepspeed

            init_single_process_group()
            config = zero2_config(shape.batch_size, shape.hidden, args.offload_optimizer)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=config
            )
            self.model = self.engine.module
        else:
            self.model, self.optimizer = model, optimizer

    @property
    def runner(self):
        """What a training forward pass calls: the engine (DeepSpeed) or the model."""
        return self.engine if self.engine is not None else self.model

    def step(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_phase(stepper: Stepper, shape: Shape, device: torch.device, chunk_mib: float) -> dict[str, float]:
    """Warm-up steps, then timed steps of the constrained loss on random tokens; tokens/s and the losses."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    mask = torch.zeros(shape.batch_size, shape.seq_len, dtype=torch.bool, device=device)
    mask[:, shape.seq_len // 2 :] = True  # the loss is on the second half, the "response"
    betas = betas_for_mask(mask, beta_schedule(shape.seq_len, first=0.5, prefix=2.0, prefix_len=5, rest=0.1))
    betas = betas.to(device)
    # fixed fake reference log-probs: about log(1 / vocab), the level of an untrained model
    reference = -math.log(shape.vocab) + 0.1 * torch.randn(mask.shape, generator=gen).to(device)
    stepper.model.train()
    losses: list[float] = []
    start = 0.0
    for step in range(shape.warmup_steps + shape.steps):
        if step == shape.warmup_steps:
            synchronize(device)
            start = time.perf_counter()
        ids = torch.randint(0, shape.vocab, (shape.batch_size, shape.seq_len), generator=gen).to(device)
        policy, _ = target_logprobs(stepper.runner, ids, target_mask=mask, chunk_mib=chunk_mib)
        loss = constrained_token_loss(policy, reference, mask, betas)
        stepper.step(loss)
        losses.append(float(loss.detach()))
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = shape.batch_size * shape.seq_len * shape.steps
    return {
        "train_seconds": seconds,
        "train_tokens_per_s": tokens / seconds,
        "step_seconds": seconds / shape.steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


@torch.no_grad()
def generation_phase(model, shape: Shape, device: torch.device, caches: list[str]) -> dict[str, Any]:
    """HF generate on a batch of random prompts, greedy, every sequence the full length, once per KV cache
    implementation, as `HFEngine` runs it (a static cache is one `KeptStaticCache`, reset per call): the
    first call (where a static cache compiles on CUDA) untimed, then GEN_TIMED_CALLS timed ones (a cache
    whose CUDA graphs were recorded again per call would show here); the tokens of each cache compared
    with the first cache's."""
    model.eval()
    model.config.use_cache = True
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompts = torch.randint(0, shape.vocab, (shape.gen_batch, shape.gen_prompt_len), generator=gen).to(device)
    kwargs = dict(
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=shape.gen_new_tokens,
        min_new_tokens=shape.gen_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    results: dict[str, Any] = {}
    baseline = None
    kept = KeptStaticCache(model)
    length = shape.gen_prompt_len + shape.gen_new_tokens

    def generate(cache: str) -> torch.Tensor:
        extra = {} if cache == "dynamic" else {cache_kwarg(model): kept.get(shape.gen_batch, length)}
        return model.generate(prompts, **kwargs, **extra)

    for cache in caches:
        synchronize(device)
        start = time.perf_counter()
        generate(cache)  # kernels, allocator, compilation: untimed
        synchronize(device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(GEN_TIMED_CALLS):
            out = generate(cache)
        synchronize(device)
        seconds = (time.perf_counter() - start) / GEN_TIMED_CALLS
        new = out[:, shape.gen_prompt_len :]
        baseline = new if baseline is None else baseline
        results[cache] = {
            "first_seconds": first,
            "seconds": seconds,
            "new_tokens": new.numel(),
            "tokens_per_s": new.numel() / seconds,
            "same_tokens": bool(torch.equal(new, baseline)),
        }
    return results


def gib(n_bytes: int) -> float:
    return n_bytes / 2**30


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = shape_from(args)
    if args.dry_run:
        device, dtype, use_deepspeed = torch.device("cpu"), torch.float32, False
        torch.set_num_threads(1)  # the tiny model gains nothing from threads; a busy machine loses a lot
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA GPU visible (use --dry-run to exercise the code on a CPU)")
        device, dtype, use_deepspeed = torch.device("cuda", 0), torch.bfloat16, True
        torch.cuda.set_device(device)
    model = build_model(shape, dtype, device)
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    n_params = sum(p.numel() for p in model.parameters())
    stepper = Stepper(model, args, shape, use_deepspeed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results: dict[str, Any] = {
        "params": n_params,
        **train_phase(stepper, shape, device, args.logprob_chunk_mib),
    }
    if device.type == "cuda":
        results["train_peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    results["generation"] = generation_phase(stepper.model, shape, device, args.gen_caches)
    if device.type == "cuda":
        results["gen_peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
    peak, peak_source = peak_flops(device, args.peak_tflops)
    results["peak_flops"], results["peak_source"] = peak, peak_source
    results["mfu"] = 6 * n_params * results["train_tokens_per_s"] / peak if peak else None
    results["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if use_deepspeed:
        offload = ", optimizer offloaded to CPU" if args.offload_optimizer else ""
        results["optimizer"] = f"DeepSpeed ZeRO-2 (launchers/zero2.json{offload}), {stepper.optimizer_name}"
    else:
        results["optimizer"] = f"plain {stepper.optimizer_name} (dry run: no DeepSpeed)"
    chunk = args.logprob_chunk_mib
    results["logprobs"] = f"chunked, {chunk:g} MiB" if chunk > 0 else "full logits"
    results["compile"] = bool(args.compile)
    results["dtype"] = str(dtype).removeprefix("torch.")
    results["shape"] = vars(shape)
    return results


def table(r: dict[str, Any]) -> str:
    s = r["shape"]
    mfu = (
        f"{100 * r['mfu']:.1f}% (peak {r['peak_flops'] / 1e12:.0f} TFLOP/s, {r['peak_source']})"
        if r["mfu"]
        else f"n/a: peak {r['peak_source']}"
    )
    na = "n/a (CPU)"
    rows = [
        ("device", r["device"]),
        (
            "model",
            f"Llama, {r['params'] / 1e6:,.1f} M params (hidden {s['hidden']}, {s['layers']} layers, "
            f"vocab {s['vocab']}), {r['dtype']}",
        ),
        (
            "training",
            f"{r['optimizer']}, token-wise constrained loss, batch {s['batch_size']} x {s['seq_len']} tokens"
            f"{', activation checkpointing' if s['checkpointing'] else ''}"
            f"{', compiled layers' if r['compile'] else ''}; log-probs: {r['logprobs']}",
        ),
        ("train tokens/s", f"{r['train_tokens_per_s']:,.0f}"),
        (
            "train step time (s)",
            f"{r['step_seconds']:.3f} (mean of {s['steps']} after {s['warmup_steps']} warm-up)",
        ),
        ("train loss first -> last", f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"),
        ("MFU", mfu),
        ("peak memory, training (GiB)", f"{r['train_peak_gib']:.2f}" if "train_peak_gib" in r else na),
    ]
    shape = f"batch {s['gen_batch']}, {s['gen_prompt_len']} prompt + {s['gen_new_tokens']} new tokens, greedy"
    base = next(iter(r["generation"].values()))["tokens_per_s"]
    for cache, g in r["generation"].items():
        same = "yes" if g["same_tokens"] else "NO"
        rows.append(
            (
                f"generation tokens/s, {cache} KV cache",
                f"{g['tokens_per_s']:,.0f} ({g['tokens_per_s'] / base:.2f}x; {shape}; first call "
                f"{g['first_seconds']:.1f} s; same tokens as the first: {same})",
            )
        )
    rows.append(("peak memory, generation (GiB)", f"{r['gen_peak_gib']:.2f}" if "gen_peak_gib" in r else na))
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(f"deepalign GPU check{' (dry run on CPU)' if args.dry_run else ''}: torch {torch.__version__}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
