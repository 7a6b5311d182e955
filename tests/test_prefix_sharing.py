"""Prefix sharing in the generation engine: rows whose ids start a longer row's are decoded from that row's
KV cache (a prefilling attack's depths nest), with the same tokens as each decoded from its own prompt."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepalign.chat import encode_for_generation
from deepalign.generation import GenerationRequest, HFEngine, SamplingParams, _Row, prefix_families
from deepalign.models import load_model

PROMPTS = [
    "Tell me a long story about a dragon and a knight who become friends.",
    "What is 2+2?",
    "Write a haiku about autumn leaves falling on a quiet pond in the mountains at dusk.",
]
PREFILL = " Sure, here is a detailed answer with every step you asked for, one after the other, in order."
GREEDY = SamplingParams(max_new_tokens=10)
SAMPLED = SamplingParams(do_sample=True, temperature=1.0, top_p=0.9, max_new_tokens=8)


@pytest.fixture(scope="module")
def lively(tiny_model_config):
    """The tiny model with larger random weights, so that greedy continuations vary with the prompt."""
    arch = {**tiny_model_config.arch, "initializer_range": 0.3}
    return load_model(dataclasses.replace(tiny_model_config, arch=arch))


def nested_requests(
    tokenizer, params: SamplingParams, depths=(0, 3, 7, 15), n: int = 1
) -> list[GenerationRequest]:
    """For each prompt, the plain request and prefills of `depths` tokens cut from one rendering."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        full = encode_for_generation(tokenizer, prompt, prefill=PREFILL)
        plain = encode_for_generation(tokenizer, prompt)
        assert full[: len(plain)] == plain
        for k in depths:
            out.append(GenerationRequest(f"k={k}/{i}", full[: len(plain) + k], params, n=n, seed=3))
    return out


def generate(loaded, requests, *, share: bool, batch_size: int = 4) -> dict[tuple[str, int], list[int]]:
    engine = HFEngine(
        loaded.model, loaded.tokenizer, batch_size=batch_size, progress=False, share_prefixes=share
    )
    results = list(engine.generate(requests))
    keyed = {(r.id, r.sample): r.token_ids for r in results}
    assert len(keyed) == len(results), "a (id, sample) pair came back twice"
    return keyed


def test_families_group_nested_ids_under_the_longest():
    rows = [_Row(GREEDY, ids, []) for ids in ([1, 2], [1, 2, 3, 4], [1, 2, 3], [5, 6], [1, 9], [5, 6])]
    families = prefix_families(rows)
    assert [[r.input_ids for r in f.rows] for f in families] == [
        [[1, 2, 3, 4], [1, 2, 3], [1, 2]],
        [[1, 9]],
        [[5, 6], [5, 6]],
    ]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_prefixes_give_the_tokens_of_separate_prompts(lively, batch_size):
    requests = nested_requests(lively.tokenizer, GREEDY)
    plain = generate(lively, requests, share=False)
    shared = generate(lively, requests, share=True, batch_size=batch_size)
    assert shared == plain
    assert len({tuple(t) for t in plain.values()}) > len(PROMPTS)  # the continuations really differ


def test_sampled_rows_are_decoded_from_their_own_prompts(lively):
    """Sampled rows are not shared: a draw landing within rounding noise of a boundary would change."""
    requests = nested_requests(lively.tokenizer, SAMPLED, n=2) + nested_requests(lively.tokenizer, GREEDY)[:4]
    requests = [dataclasses.replace(r, id=f"{r.params.do_sample}/{r.id}") for r in requests]
    assert generate(lively, requests, share=True) == generate(lively, requests, share=False)


def test_equal_greedy_requests_are_decoded_once(lively):
    requests = nested_requests(lively.tokenizer, GREEDY, depths=(0, 5))
    twins = [dataclasses.replace(r, id=f"twin/{r.id}", n=2) for r in requests]
    engine = HFEngine(lively.model, lively.tokenizer, batch_size=8, progress=False)
    results = {(r.id, r.sample): r.token_ids for r in engine.generate(requests + twins)}
    assert engine.stats.sequences == len(requests)  # the twins share the rows of their equals
    for r in requests:
        assert results[(f"twin/{r.id}", 0)] == results[(f"twin/{r.id}", 1)] == results[(r.id, 0)]


def test_a_row_decodes_from_the_same_root_whatever_is_pending(lively):
    """With the other requests as context, a resumed call (only some depths pending) decodes each row from the
    root the whole call would use: the same tokens."""
    requests = nested_requests(lively.tokenizer, GREEDY)
    whole = generate(lively, requests, share=True)
    pending = [r for r in requests if r.id.startswith(("k=0/", "k=7/"))]
    engine = HFEngine(lively.model, lively.tokenizer, batch_size=4, progress=False)
    resumed = {
        (r.id, r.sample): r.token_ids for r in engine.generate(pending, [r.input_ids for r in requests])
    }
    assert resumed == {key: whole[key] for key in resumed} and len(resumed) == len(pending)


def test_records_decoded_without_sharing_are_named_apart():
    from deepalign.generation_store import computation_id

    assert computation_id("w", 3, "dynamic", True) == "w:seed=3"  # the default: records stay valid
    assert computation_id("w", 3, "dynamic", False) == "w:seed=3:prefixes=own"
    assert computation_id("w", 3, "static", False) == "w:seed=3:cache=static"  # a static cache shares none


def test_the_config_switches_sharing_off(lively):
    from deepalign.config import GenerationConfig
    from deepalign.generation import make_engine

    assert make_engine(GenerationConfig(dtype="float32"), lively, progress=False).share_prefixes
    off = GenerationConfig(dtype="float32", share_prefixes=False)
    assert not make_engine(off, lively, progress=False).share_prefixes
    static = GenerationConfig(dtype="float32", cache="static")
    assert not make_engine(static, lively, progress=False).share_prefixes


def test_a_compact_cache_holds_each_rows_own_columns(lively):
    """Each row keeps its root's cached columns of its own ids only, right-aligned: the same keys and values
    as a forward pass over its ids alone, and a batch as wide as its longest row, not as its roots."""
    from deepalign.generation import HFEngine, _Row, compact_cache

    engine = HFEngine(lively.model, lively.tokenizer, progress=False)
    requests = nested_requests(lively.tokenizer, GREEDY, depths=(0, 7, 15))
    roots = [_Row(GREEDY, r.input_ids, []) for r in requests if r.id.startswith("k=15/")]
    prefix = engine._prefix(roots, torch.device("cpu"))
    picked = [(0, 5), (2, 9), (1, 3)]  # (root, cached tokens)
    index = torch.tensor([i for i, _ in picked])
    lengths = torch.tensor([n for _, n in picked])
    cache = compact_cache(prefix.cache, index, torch.tensor([prefix.starts[i] for i, _ in picked]), lengths)
    assert cache.layers[0].keys.shape[2] == 9 < prefix.ids.shape[1]
    for j, (i, n) in enumerate(picked):
        with torch.no_grad():
            alone = lively.model(input_ids=torch.tensor([roots[i].input_ids[:n]]), use_cache=True)
        own = alone.past_key_values
        for mine, theirs in zip(cache.layers, own.layers, strict=True):
            for got, want in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                torch.testing.assert_close(got[j, :, 9 - n :], want[0], atol=1e-5, rtol=1e-4)


def test_a_cache_missing_prefix_columns_is_refused(lively):
    from transformers import DynamicCache

    from deepalign.generation import compact_cache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), 0)  # 4 columns kept of a longer prefix
    with pytest.raises(ValueError, match="share_prefixes=false"):
        compact_cache(cache, torch.tensor([0]), torch.tensor([2]), torch.tensor([5]))
