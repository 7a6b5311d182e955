"""Batched generation (deepalign.generation.HFEngine) vs one prompt at a time with `model.generate`.

    python bench/generation.py                 # SmolLM2-135M-Instruct, 32 prompts, 32 new tokens, greedy
    python bench/generation.py --quick         # the tiny random model, 8 prompts, 8 new tokens

The prompts are the packaged benign prompts, chat-formatted through the tokenizer's template
(`encode_for_generation`), the same ids for every variant. The baseline calls `model.generate` on one prompt
at a time with the engine's own settings (greedy, its EOS ids and pad id, KV cache); the engine pads a batch
on the left and runs it in one call. Tokens/s counts generated tokens up to EOS (EOS and padding excluded),
so a batch gets no credit for the padding of rows that finished early. All variants run in one process, one
after the other, after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, machine_line, markdown_table, set_threads  # noqa: E402


def load(model_name: str):
    from hydra import compose, initialize_config_module

    from deepalign.config import register_configs, validate
    from deepalign.models import load_model

    register_configs()
    with initialize_config_module(config_module="deepalign.conf", version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=[f"model={model_name}", "logger=none"]))
    return load_model(cfg.model)


def prompts(n: int) -> list[str]:
    text = resources.files("deepalign.assets").joinpath("data/benign_prompts.jsonl").read_text()
    rows = [json.loads(line)["prompt"] for line in text.split("\n") if line.strip()]
    return [rows[i % len(rows)] for i in range(n)]


def one_at_a_time(engine, ids: list[list[int]], max_new_tokens: int) -> tuple[float, int]:
    """Seconds and generated tokens (up to EOS) for `model.generate` on each prompt alone."""
    kwargs = engine._generate_kwargs(engine_params(max_new_tokens))  # the engine's exact decoding settings
    eos = set(engine.eos_ids)
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            out = engine.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
            new = out[0, x.shape[1] :].tolist()
            tokens += next((i for i, t in enumerate(new) if t in eos), len(new))
    return time.perf_counter() - start, tokens


def engine_params(max_new_tokens: int):
    from deepalign.generation import SamplingParams

    return SamplingParams(do_sample=False, max_new_tokens=max_new_tokens)


def batched(engine, ids: list[list[int]], max_new_tokens: int) -> tuple[float, int]:
    from deepalign.generation import GenerationRequest

    params = engine_params(max_new_tokens)
    requests = [GenerationRequest(id=str(i), input_ids=row, params=params) for i, row in enumerate(ids)]
    start = time.perf_counter()
    tokens = sum(len(r.token_ids) for r in engine.generate(requests))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m_instruct", help="a model= config (conf/model/)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument(
        "--autocast", choices=["bfloat16"], help="also run the batched engine under bf16 autocast"
    )
    parser.add_argument("--quick", action="store_true", help="tiny random model, 8 prompts, 8 new tokens")
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.model, args.prompts, args.max_new_tokens, args.batch_sizes = "tiny", 8, 8, [4, 8]
    set_threads(args.threads)

    from deepalign.chat import encode_for_generation
    from deepalign.generation import HFEngine

    loaded = load(args.model)
    tok = loaded.tokenizer
    ids = [encode_for_generation(tok, p) for p in prompts(args.prompts)]
    engine = HFEngine(loaded.model, tok, batch_size=max(args.batch_sizes), progress=False)
    batched(engine, ids[:2], 4)  # warm-up (first-call allocations, lazy inits)

    seq_s, seq_tokens = one_at_a_time(engine, ids, args.max_new_tokens)
    base = seq_tokens / seq_s
    rows = [["one at a time (`model.generate`)", 1, f"{seq_s:.1f}", seq_tokens, f"{base:.1f}", "1.00x"]]
    settings = [(b, None) for b in args.batch_sizes]
    if args.autocast:
        settings += [(b, torch.bfloat16) for b in args.batch_sizes]
    for batch_size, autocast in settings:
        engine = HFEngine(loaded.model, tok, batch_size=batch_size, progress=False, autocast=autocast)
        seconds, tokens = batched(engine, ids, args.max_new_tokens)
        name = "HFEngine" + (" (bf16 autocast)" if autocast else "")
        rows.append([name, batch_size, f"{seconds:.1f}", tokens, f"{tokens / seconds:.1f}"])
        rows[-1].append(f"{tokens / seconds / base:.2f}x")

    print(
        f"model={args.model}, {args.prompts} prompts, greedy, up to {args.max_new_tokens} new tokens; "
        f"{machine_line()}\n"
    )
    print(markdown_table(["generation", "batch", "wall (s)", "tokens", "tokens/s", "vs one at a time"], rows))
    print("\nTarget: batched >= 5x one at a time on a CPU.")
    for row in rows[1:]:
        speedup = float(row[-1][:-1])
        print(f"- {row[0]} batch {row[1]}: {speedup:.2f}x ({'met' if speedup >= 5 else 'MISSED'})")


if __name__ == "__main__":
    main()
