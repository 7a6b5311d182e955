"""Batched generation (deepalign.generation.HFEngine) vs one prompt at a time with `model.generate`, the
engine's per-row sampler vs greedy decoding at the same shape, and its KV caches (dynamic vs static).

    python bench/generation.py                 # SmolLM2-135M-Instruct, 32 prompts, 32 new tokens
    python bench/generation.py --quick         # the tiny random model, 8 prompts, 8 new tokens
    python bench/generation.py --only-caches   # the cache table alone (e.g. on a GPU)
    python bench/generation.py --only-prefixes --batch-sizes 48   # nested prefills: prefix sharing vs not

The prompts are the packaged benign prompts, chat-formatted through the tokenizer's template
(`encode_for_generation`), the same ids for every variant. The baseline calls `model.generate` on one prompt
at a time with the engine's own settings (greedy, its EOS ids and pad id, KV cache); the engine pads a batch
on the left and runs it in one call. Tokens/s counts generated tokens up to EOS (EOS and padding excluded),
so a batch gets no credit for the padding of rows that finished early. All variants run in one process, one
after the other, after one warm-up call.

The second table runs the same prompts at the largest batch size, greedy and sampled (each sample drawn from
its own seeded generator, see `RowSampler`), next to transformers' own sampler (one RNG for the whole batch,
so a row's sample depends on its batch). A sampled row can stop at EOS earlier or later than the greedy one,
so the comparison is per decoding step: a batch runs until its longest row ends, and its steps are that
row's length (EOS included); time per step = the wall time of `generate` / the steps of all batches. Each
variant runs `--repeats` times, in rounds over all variants, and the median run is reported.

The third table runs the same prompts greedily at the largest batch size with each KV cache (`--caches`,
`generation.cache`): transformers' dynamic one, and a static one, with which `generate` compiles the decoding
step (torch.compile, CUDA graphs) on a CUDA device. Each cache's first run, which pays for the compilation,
is timed apart; then `--repeats` runs in rounds, the median reported, and each cache's tokens compared with
the first cache's.

The fourth table has a prefilling attack's shape: each prompt with the first k tokens of one answer for each
of `--depths`, greedy, decoded with prefix sharing (the engine's default: one forward pass over a prompt's
deepest prefill, whose KV cache its shallower ones decode from) and with every row from its own prompt.
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
            x = torch.tensor([row], device=engine.model.device)
            out = engine.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
            new = out[0, x.shape[1] :].tolist()
            tokens += next((i for i, t in enumerate(new) if t in eos), len(new))
    return time.perf_counter() - start, tokens


def engine_params(max_new_tokens: int):
    from deepalign.generation import SamplingParams

    return SamplingParams(do_sample=False, max_new_tokens=max_new_tokens)


def decoding_steps(lengths: list[list[int]], max_new_tokens: int) -> int:
    """The forward passes of batches whose rows generated these lengths (EOS included)."""
    return sum(min(max(batch), max_new_tokens) for batch in lengths)


def with_steps(engine, ids: list[list[int]], params) -> tuple[float, int, int, float | None]:
    """Seconds, generated tokens (up to EOS) and decoding steps of the engine on these prompts (its stats),
    and the seconds spent in the per-row sampler (`RowSampler` calls)."""
    from deepalign.generation import GenerationRequest, RowSampler

    requests = [GenerationRequest(id=str(i), input_ids=row, params=params) for i, row in enumerate(ids)]
    untimed, in_sampler = RowSampler.__call__, [0.0]

    def timed(sampler, input_ids, scores):
        start = time.perf_counter()
        try:
            return untimed(sampler, input_ids, scores)
        finally:
            in_sampler[0] += time.perf_counter() - start

    RowSampler.__call__ = timed
    try:
        results = {(r.id, r.sample): r for r in engine.generate(requests)}
    finally:
        RowSampler.__call__ = untimed
    lengths = [
        [len(results[(r.id, s)].token_ids) + results[(r.id, s)].finished for r, s in batch]
        for batch in engine.plan(requests)
    ]
    stats = engine.stats
    return stats.seconds, stats.new_tokens, decoding_steps(lengths, params.max_new_tokens), in_sampler[0]


def transformers_sampler(engine, ids: list[list[int]], params) -> tuple[float, int, int, float | None]:
    """The same batches through `model.generate(do_sample=True)`: one RNG for the whole batch."""
    from deepalign.generation import GenerationRequest
    from deepalign.logprobs import pad_sequences

    requests = [GenerationRequest(id=str(i), input_ids=row, params=params) for i, row in enumerate(ids)]
    kwargs = engine._generate_kwargs(params)
    kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    eos = set(engine.eos_ids)
    seconds, tokens, lengths = 0.0, 0, []
    torch.manual_seed(0)
    for batch in engine.plan(requests):
        prompts = [r.input_ids for r, _ in batch]
        x = pad_sequences(prompts, engine.pad_id, side="left").to(engine.model.device)
        mask = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(engine.model.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = engine.model.generate(input_ids=x, attention_mask=mask, **kwargs)
        seconds += time.perf_counter() - start
        rows = []
        for new in out[:, x.shape[1] :].tolist():
            cut = next((i for i, t in enumerate(new) if t in eos), None)
            tokens += len(new) if cut is None else cut
            rows.append(len(new) if cut is None else cut + 1)
        lengths.append(rows)
    return seconds, tokens, decoding_steps(lengths, params.max_new_tokens), None


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
    parser.add_argument(
        "--sampling",
        nargs="*",
        default=["temperature=0.7", "top_p=0.9"],
        help="SamplingParams settings to compare with greedy at the largest batch size (none: skip)",
    )
    parser.add_argument(
        "--caches",
        nargs="*",
        default=["dynamic", "static"],
        help="KV caches (generation.cache) to compare, greedy, at the largest batch size (none: skip)",
    )
    parser.add_argument("--only-caches", action="store_true", help="only the cache table")
    parser.add_argument(
        "--depths",
        type=int,
        nargs="*",
        default=[0, 5, 10, 20, 40, 70, 100],
        help="prefill depths of the nested-prefill table, an attack's shape (none: skip)",
    )
    parser.add_argument("--only-prefixes", action="store_true", help="only the nested-prefill table")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (the median)")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 8 prompts, 8 new tokens")
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.model, args.prompts, args.max_new_tokens, args.batch_sizes = "tiny", 8, 8, [4, 8]
        args.repeats = 1
    set_threads(args.threads)

    from deepalign.chat import encode_for_generation
    from deepalign.generation import HFEngine

    loaded = load(args.model)
    tok = loaded.tokenizer
    ids = [encode_for_generation(tok, p) for p in prompts(args.prompts)]
    if args.only_prefixes:
        print(f"model={args.model}, {args.prompts} prompts; {machine_line()}")
        compare_prefixes(
            loaded, max(args.batch_sizes), args.max_new_tokens, args.depths, args.prompts, args.repeats
        )
        return
    if args.only_caches:
        print(f"model={args.model}, {args.prompts} prompts; {machine_line()}")
        compare_caches(loaded, ids, max(args.batch_sizes), args.max_new_tokens, args.caches, args.repeats)
        return
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
    if args.sampling:
        batch_size = max(args.batch_sizes)
        compare_sampling(loaded, ids, batch_size, args.max_new_tokens, args.sampling, args.repeats)
    if args.caches:
        compare_caches(loaded, ids, max(args.batch_sizes), args.max_new_tokens, args.caches, args.repeats)
    if args.depths:
        compare_prefixes(
            loaded, max(args.batch_sizes), args.max_new_tokens, args.depths, args.prompts, args.repeats
        )


ANSWER = (
    " Sure, here is a detailed plan. First, gather everything you need and set it out on a clean table, in"
    " the order you will use it. Second, read the instructions twice, note each step that needs a tool, and"
    " check that the tools work. Third, start with the smallest part, test it, and only then go on to the"
    " next one, writing down what you did. Fourth, when every part works, put them together, test the whole,"
    " and keep your notes for the next time, with what went wrong and how you fixed it, step by step."
)


def compare_prefixes(
    loaded, batch_size: int, max_new_tokens: int, depths: list[int], n_prompts: int, repeats: int
) -> None:
    """A prefilling attack's shape, greedy: each prompt with the first k tokens of one answer for every depth
    k (nested prefixes), decoded with prefix sharing (one forward pass over each prompt's deepest prefill,
    whose KV cache the shallower ones decode from) and with every row from its own prompt: wall time, the
    tokens the model processed (prompt and new), and whether the tokens are the same."""
    from deepalign.chat import encode_for_generation
    from deepalign.generation import GenerationRequest, HFEngine

    tok, params = loaded.tokenizer, engine_params(max_new_tokens)
    requests = []
    for i, prompt in enumerate(prompts(n_prompts)):
        full, plain = (encode_for_generation(tok, prompt, prefill=p) for p in (ANSWER, ""))
        for k in depths:
            requests.append(GenerationRequest(f"k={k}/{i}", full[: len(plain) + k], params))
    prompt_tokens = sum(len(r.input_ids) for r in requests)

    def measure(share: bool) -> tuple[float, int, dict[str, list[int]]]:
        engine = HFEngine(loaded.model, tok, batch_size=batch_size, progress=False, share_prefixes=share)
        results = {r.id: r.token_ids for r in engine.generate(requests)}
        return engine.stats.seconds, engine.stats.new_tokens, results

    runs: dict[bool, list] = {False: [], True: []}
    for _ in range(repeats):  # rounds, so a busy spell of the machine hits both
        for share in runs:
            runs[share].append(measure(share))
    rows, base, reference = [], 0.0, None
    for share, name in ((False, "each row from its own prompt"), (True, "prefix sharing")):
        seconds, tokens, results = sorted(runs[share], key=lambda r: r[0])[len(runs[share]) // 2]
        base, reference = base or seconds, reference or results
        differ = sum(results[k] != reference[k] for k in reference)
        same = "yes" if differ == 0 else f"NO ({differ} of {len(reference)} rows differ)"
        rows.append(
            [name, f"{seconds:.1f}", tokens, f"{tokens / seconds:.1f}", f"{base / seconds:.2f}x", same]
        )
    print(
        f"\nNested prefills (depths {depths}), {n_prompts} prompts x {len(depths)} depths = {len(requests)} "
        f"greedy requests ({prompt_tokens} prompt tokens), batch {batch_size}, up to {max_new_tokens} new "
        f"tokens, median of {repeats}:\n"
    )
    print(
        markdown_table(
            ["decoding", "wall (s)", "new tokens", "new tokens/s", "speed-up", "same tokens"], rows
        )
    )


def compare_caches(
    loaded, ids: list[list[int]], batch_size: int, max_new_tokens: int, caches: list[str], repeats: int
) -> None:
    """Greedy generation with each KV cache at one batch size: tokens/s (the median of `repeats` runs after
    a first, separately timed run), and whether its tokens are the first cache's."""
    from deepalign.generation import GenerationRequest, HFEngine

    params = engine_params(max_new_tokens)
    requests = [GenerationRequest(id=str(i), input_ids=row, params=params) for i, row in enumerate(ids)]

    def measure(cache: str) -> tuple[float, int, dict[str, list[int]]]:
        engine = HFEngine(loaded.model, loaded.tokenizer, batch_size=batch_size, progress=False, cache=cache)
        results = {r.id: r.token_ids for r in engine.generate(requests)}
        return engine.stats.seconds, engine.stats.new_tokens, results

    first = {cache: measure(cache)[0] for cache in caches}  # allocations and, static on CUDA, compilation
    runs: dict[str, list] = {cache: [] for cache in caches}
    for _ in range(repeats):  # rounds over the caches, so a busy spell of the machine hits them all
        for cache in caches:
            runs[cache].append(measure(cache))
    rows, base, reference = [], 0.0, None
    for cache in caches:
        seconds, tokens, results = sorted(runs[cache], key=lambda r: r[0])[len(runs[cache]) // 2]
        speed = tokens / seconds
        base, reference = base or speed, reference or results
        differ = sum(results[k] != reference[k] for k in reference)
        same = "yes" if differ == 0 else f"NO ({differ} of {len(reference)} rows differ)"
        rows.append([cache, f"{first[cache]:.1f}", f"{seconds:.2f}", tokens, f"{speed:.1f}"])
        rows[-1] += [f"{speed / base:.2f}x", same]
    device = loaded.model.device
    print(
        f"\nKV cache, greedy, batch {batch_size}, up to {max_new_tokens} new tokens, on {device}, "
        f"median of {repeats} after a first run:\n"
    )
    header = ["cache", "first run (s)", "wall (s)", "tokens", "tokens/s", f"vs {caches[0]}", "same tokens"]
    print(markdown_table(header, rows))
    step = "the static cache's decoding step"
    compiled = f"compiles {step}" if device.type == "cuda" else f"does not compile {step} (on CUDA it does)"
    print(
        "\nTarget (a GPU): static >= 5x dynamic tokens/s with the same tokens. "
        f"On {device.type}, transformers {compiled}."
    )


def compare_sampling(
    loaded, ids: list[list[int]], batch_size: int, max_new_tokens: int, settings, repeats: int
) -> None:
    """The per-row sampler vs greedy (and transformers' sampler) at one batch size: time per decoding step."""
    import dataclasses

    from deepalign.generation import HFEngine

    def engine() -> HFEngine:  # every row decoded from its own prompt, as `plan` batches it
        return HFEngine(
            loaded.model, loaded.tokenizer, batch_size=batch_size, progress=False, share_prefixes=False
        )

    greedy = engine_params(max_new_tokens)
    variants = [("greedy", lambda: with_steps(engine(), ids, greedy))]
    for setting in settings:
        key, value = setting.split("=")
        params = dataclasses.replace(greedy, do_sample=True, **{key: type(getattr(greedy, key))(value)})
        variants.append((f"per-row sampler, {setting}", lambda p=params: with_steps(engine(), ids, p)))
        variants.append(
            (f"transformers' sampler, {setting}", lambda p=params: transformers_sampler(engine(), ids, p))
        )
    runs: dict[str, list] = {name: [] for name, _ in variants}
    for _ in range(repeats):  # rounds over all variants, so a busy spell of the machine hits them all
        for name, measure in variants:
            runs[name].append(measure())
    rows, verdicts, base = [], [], 0.0
    for name, _ in variants:
        seconds, tokens, steps, in_sampler = sorted(runs[name], key=lambda r: r[0])[len(runs[name]) // 2]
        per_step = seconds / steps
        base = base or per_step  # greedy's
        sampler = "-" if in_sampler is None else f"{in_sampler / steps * 1e3:.0f}"
        speed = f"{tokens / seconds:.1f}"
        rows.append([name, f"{seconds:.1f}", tokens, speed, steps, f"{per_step * 1e3:.0f}", sampler])
        rows[-1].append(f"{per_step / base:.2f}x")
        if in_sampler and name.startswith("per-row"):
            verdicts.append((name, per_step / base, 1 + in_sampler / steps / base))
    print(
        f"\nSampling vs greedy, batch {batch_size}, up to {max_new_tokens} new tokens, median of {repeats}:\n"
    )
    header = ["decoding", "wall (s)", "tokens", "tokens/s", "steps", "ms/step", "in the sampler (ms/step)"]
    print(markdown_table([*header, "time per step vs greedy"], rows))
    print(
        "\nTarget: the per-row sampler within 10% of greedy, time per step <= 1.10x. Measured twice: the "
        "wall ratio, and (greedy's step + the time in the sampler) / greedy's step, which the machine's "
        "noise moves far less (the verdict)."
    )
    for name, ratio, own in verdicts:
        verdict = "met" if own <= 1.10 else "MISSED"
        print(f"- {name}: {ratio:.2f}x wall, {own:.2f}x by the sampler's time ({verdict})")


if __name__ == "__main__":
    main()
