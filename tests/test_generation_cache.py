"""The static KV cache (`generation.cache=static`): the same tokens as the dynamic one, greedy and sampled,
its own key in the generation store, and its config key checked."""

from __future__ import annotations

import dataclasses
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config
from test_generation import PROMPTS as GENERATION_PROMPTS

from deepalign.chat import encode_for_generation
from deepalign.config import ConfigError, validate
from deepalign.eval_items import EvalItem, Variant
from deepalign.generation import (
    GenerationRequest,
    HFEngine,
    SamplingParams,
    VLLMEngine,
    eos_token_ids,
    make_engine,
)
from deepalign.generation_store import computation_id, generate_variant
from deepalign.models import load_model
from deepalign.storage.jsonl import JsonlStore

PROMPTS = GENERATION_PROMPTS[:5]  # prompts of different lengths: the batches are left-padded
GREEDY = SamplingParams(max_new_tokens=10)
SAMPLED = SamplingParams(do_sample=True, temperature=0.8, top_k=40, max_new_tokens=10)
# What the forward passes of a dynamic-cache generate see: transformers 5.0 lets the model make its
# DynamicCache in the first (prefill) pass, later versions pass one in from the start.
DYNAMIC = {"DynamicCache", "NoneType"}


@pytest.fixture(scope="module")
def lively(tiny_model_config):
    """The tiny model with larger random weights, so greedy continuations vary by prompt and position."""
    arch = {**tiny_model_config.arch, "initializer_range": 0.3}
    return load_model(dataclasses.replace(tiny_model_config, arch=arch))


@pytest.fixture(scope="module")
def prompt_ids(lively):
    return [encode_for_generation(lively.tokenizer, p) for p in PROMPTS]


def requests_for(prompt_ids, params, n=1):
    return [GenerationRequest(f"r/{i}", ids, params, n=n, seed=7) for i, ids in enumerate(prompt_ids)]


def run(loaded, requests, cache: str) -> tuple[dict[tuple[str, int], list[int]], list[str]]:
    """Each (id, sample)'s tokens and finished flag, and the type of KV cache every forward pass was given."""
    engine = HFEngine(loaded.model, loaded.tokenizer, batch_size=3, progress=False, cache=cache)
    caches: list[str] = []

    def spy(module, args, kwargs):
        cache_arg = kwargs.get("cache", kwargs.get("past_key_values"))  # the argument's 5.x names
        caches.append(type(cache_arg).__name__)

    hook = loaded.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        results = {(r.id, r.sample): (r.token_ids, r.finished) for r in engine.generate(requests)}
    finally:
        hook.remove()
    return results, caches


def test_static_greedy_equals_dynamic_with_left_padding_and_eos(tiny_model_config, prompt_ids):
    """Batches of 3 left-padded prompts of different lengths; a token of one row's continuation is made an
    extra EOS, so some rows stop early and the others run to max_new_tokens."""
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids)
    arch = {**tiny_model_config.arch, "initializer_range": 0.3}
    loaded = load_model(dataclasses.replace(tiny_model_config, arch=arch))  # a private copy: its EOS changes
    reqs = requests_for(prompt_ids, GREEDY)
    before, _ = run(loaded, reqs, "dynamic")
    row0 = before[("r/0", 0)][0]
    assert len(row0) == 10 and len({tuple(t) for t, _ in before.values()}) == len(reqs)
    stop = next(t for j, t in enumerate(row0) if j >= 3 and t not in row0[:j])
    loaded.model.generation_config.eos_token_id = [loaded.tokenizer.eos_token_id, stop]

    dynamic, dynamic_caches = run(loaded, reqs, "dynamic")
    static, static_caches = run(loaded, reqs, "static")
    assert static == dynamic
    finished = [done for _, done in static.values()]
    assert any(finished) and not all(finished)
    assert static[("r/0", 0)] == (row0[: row0.index(stop)], True)
    assert set(static_caches) == {"StaticCache"} and set(dynamic_caches) <= DYNAMIC


def test_static_sampled_rows_equal_dynamic(lively, prompt_ids):
    """Sampled rows (the engine's RowSampler, seeded per row) draw the same tokens with either cache."""
    reqs = requests_for(prompt_ids[:3], SAMPLED, n=2)  # 6 rows: two batches of 3
    dynamic, _ = run(lively, reqs, "dynamic")
    static, caches = run(lively, reqs, "static")
    assert len(dynamic) == 2 * len(reqs) and static == dynamic
    assert dynamic[("r/1", 0)] != dynamic[("r/1", 1)]  # two samples of a prompt differ: it really sampled
    assert set(caches) == {"StaticCache"}


def test_static_engine_keeps_one_cache_across_batches_and_calls(lively, prompt_ids):
    """One StaticCache serves every batch of a call and the later calls, reset in between (the tokens equal
    the dynamic cache's); it is made anew only for another number of rows or a longer call. A compiled
    decoding step's CUDA graphs are recorded for the tensors of one cache."""
    engine = HFEngine(lively.model, lively.tokenizer, batch_size=2, progress=False, cache="static")
    dynamic = HFEngine(lively.model, lively.tokenizer, batch_size=2, progress=False)
    caches: list[tuple[int, int, int]] = []  # (object id, rows, length) of the cache each forward pass got
    alive = []  # every cache seen, kept so that no two of them share an id

    def spy(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if type(cache).__name__ == "StaticCache":
            alive.append(cache)
            caches.append((id(cache), kwargs["input_ids"].shape[0], cache.layers[0].max_cache_len))

    def tokens(engine, reqs):
        return {(r.id, r.sample): r.token_ids for r in engine.generate(reqs)}

    four, five = requests_for(prompt_ids[:4], GREEDY), requests_for(prompt_ids, GREEDY)
    longer = requests_for(prompt_ids[:2], dataclasses.replace(GREEDY, max_new_tokens=20))
    hook = lively.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        first = tokens(engine, four)  # two batches of 2
        calls = [set(caches)]
        for reqs in (four, five, longer):  # again; then 2 + 2 + 1 rows; then 20 new tokens
            caches.clear()
            assert tokens(engine, reqs) == tokens(dynamic, reqs)
            calls.append(set(caches))
    finally:
        hook.remove()
    assert "cache_implementation" not in engine._generate_kwargs(GREEDY)
    length = max(len(p) for p in prompt_ids[:4]) + GREEDY.max_new_tokens
    (one,) = calls[0]
    assert one[1:] == (2, length) and calls[1] == {one}
    two_rows = {c for c in calls[2] if c[1] == 2}
    (single,) = {c for c in calls[2] if c[1] == 1}
    assert len(two_rows) == 1 and single[0] != one[0]
    assert max(len(p) for p in prompt_ids) + GREEDY.max_new_tokens == single[2]
    (grown,) = calls[3]
    assert grown[1:] == (2, max(len(p) for p in prompt_ids[:2]) + 20) and grown[2] > single[2]
    assert first == tokens(dynamic, four)
    with pytest.raises(ValueError, match="cache must be one of dynamic, static, got 'paged'"):
        HFEngine(lively.model, lively.tokenizer, cache="paged")


def test_generation_cache_is_validated_and_reaches_the_engine(lively, monkeypatch, caplog):
    with pytest.raises(ConfigError, match=r"^generation\.cache: 'bogus' is not one of dynamic, static"):
        validate(compose_config(["model=tiny", "logger=none", "generation.cache=bogus"]))
    assert validate(compose_config(["model=tiny", "logger=none"])).generation.cache == "dynamic"
    cfg = validate(compose_config(["model=tiny", "logger=none", "generation.cache=static"])).generation
    assert cfg.cache == "static"
    assert make_engine(cfg, lively, progress=False).cache == "static"

    fake_vllm = SimpleNamespace(LLM=lambda model, **kwargs: SimpleNamespace(model=model, kwargs=kwargs))
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    vllm_cfg = dataclasses.replace(cfg, backend="vllm")
    with caplog.at_level(logging.INFO, logger="deepalign.generation"):
        engine = make_engine(vllm_cfg, lively, model_path="some/model", progress=False)
    assert isinstance(engine, VLLMEngine) and "cache" not in engine.llm.kwargs
    assert "vLLM manages its own KV cache" in caplog.text
    assert engine.eos_ids == eos_token_ids(lively.model, lively.tokenizer)


def test_computation_id_names_a_static_cache_only():
    assert computation_id("weights-abc", 3) == "weights-abc:seed=3"  # what every stored record holds
    assert computation_id("weights-abc", 3, "dynamic") == "weights-abc:seed=3"
    assert computation_id("weights-abc", 3, "static") == "weights-abc:seed=3:cache=static"


def test_store_keeps_dynamic_records_and_regenerates_for_static(lively, tmp_path):
    """Records a dynamic engine wrote carry the key they always had and are reused by a dynamic engine; a
    static engine generates them again under its own key, and then reuses its own."""
    items = [EvalItem(id=str(i), prompt=p, request=p) for i, p in enumerate(PROMPTS[:3])]
    variant = Variant(name="direct", params=GREEDY)
    path = tmp_path / "generations.jsonl"

    def generate(cache: str) -> tuple[int, dict[str, dict]]:
        engine = HFEngine(lively.model, lively.tokenizer, batch_size=2, progress=False, cache=cache)
        store = JsonlStore(path)
        keys = generate_variant(
            engine, store, variant, items, lively.tokenizer, system=None, seed=3, model_id="weights-abc"
        )
        return engine.stats.sequences, {k: JsonlStore(path).records[k] for k in keys}

    generated, dynamic = generate("dynamic")
    assert generated == 3 and {r["model_id"] for r in dynamic.values()} == {"weights-abc:seed=3"}
    assert generate("dynamic") == (0, dynamic)

    generated, static = generate("static")
    assert generated == 3 and {r["model_id"] for r in static.values()} == {"weights-abc:seed=3:cache=static"}
    assert {k: r["response"] for k, r in static.items()} == {k: r["response"] for k, r in dynamic.items()}
    assert generate("static") == (0, static)
    assert generate("dynamic")[0] == 3  # the static records are not the dynamic engine's


def test_static_cache_leaves_the_model_usable_for_dynamic_calls(lively, prompt_ids):
    """A static call leaves state on the model (transformers keeps the cache length it sized); a dynamic
    engine afterwards still gives its own tokens, and a direct `generate` the same."""
    reqs = requests_for(prompt_ids[:2], GREEDY)
    first, _ = run(lively, reqs, "dynamic")
    run(lively, requests_for(prompt_ids, GREEDY), "static")
    again, caches = run(lively, reqs, "dynamic")
    assert again == first and set(caches) <= DYNAMIC
    ids = prompt_ids[0]
    with torch.no_grad():
        out = lively.model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=lively.tokenizer.pad_token_id,
            cache_implementation="static",
        )
    assert first[("r/0", 0)][1] is False  # no EOS: all 10 tokens, as `generate` returns them
    assert out[0, len(ids) :].tolist() == first[("r/0", 0)][0]
