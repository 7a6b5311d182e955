"""The generation engine: batched vs single greedy, seeded sampling, EOS handling, grouping, backends."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config

from deepalign.chat import encode_for_generation
from deepalign.config import GenerationConfig, validate
from deepalign.generation import (
    GenerationRequest,
    GenerationResult,
    HFEngine,
    RowSampler,
    SamplingParams,
    VLLMEngine,
    default_params,
    eos_token_ids,
    make_engine,
    stable_seed,
)
from deepalign.models import load_model

PROMPTS = [
    "Hi",
    "Tell me a long story about a dragon and a knight who become friends.",
    "What is 2+2?",
    "Write a haiku about autumn leaves falling on a quiet pond in the mountains at dusk.",
    "Translate 'good morning' into French.",
    "List three primes.",
]
GREEDY = SamplingParams(max_new_tokens=12)
SAMPLED = SamplingParams(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def tiny(tiny_model_config):
    return load_model(tiny_model_config)


@pytest.fixture(scope="module")
def lively(tiny_model_config):
    """The tiny model with larger random weights: its greedy continuations depend on the prompt and vary
    token to token (the default init decodes the same token everywhere, which tests nothing)."""
    arch = {**tiny_model_config.arch, "initializer_range": 0.3}
    return load_model(dataclasses.replace(tiny_model_config, arch=arch))


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    return [encode_for_generation(tiny.tokenizer, p) for p in PROMPTS]


def requests_for(prompt_ids, params, *, n=1, seed=0, prefix="r"):
    return [
        GenerationRequest(id=f"{prefix}/{i}", input_ids=ids, params=params, n=n, seed=seed)
        for i, ids in enumerate(prompt_ids)
    ]


def run(loaded, requests, batch_size=4) -> dict[tuple[str, int], GenerationResult]:
    results = list(
        HFEngine(loaded.model, loaded.tokenizer, batch_size=batch_size, progress=False).generate(requests)
    )
    keyed = {(r.id, r.sample): r for r in results}
    assert len(keyed) == len(results), "a (id, sample) pair came back twice"
    return keyed


def tokens(results):
    return {k: r.token_ids for k, r in results.items()}


# ---------------------------------------------------------------- greedy


def test_prompts_have_different_lengths(prompt_ids):
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids)


@pytest.mark.parametrize("which", ["tiny", "lively"])
def test_batched_greedy_equals_one_at_a_time(which, request, prompt_ids):
    loaded = request.getfixturevalue(which)
    reqs = requests_for(prompt_ids, GREEDY)
    batched, single = run(loaded, reqs, batch_size=4), run(loaded, reqs, batch_size=1)
    assert set(batched) == {(r.id, 0) for r in reqs}
    assert tokens(batched) == tokens(single)
    assert {k: r.text for k, r in batched.items()} == {k: r.text for k, r in single.items()}
    if which == "lively":  # the comparison means something: continuations differ by prompt and position
        assert len({tuple(r.token_ids) for r in batched.values()}) == len(reqs)
        assert all(len(set(r.token_ids)) > 3 for r in batched.values())


def test_greedy_matches_a_direct_generate_call(lively, prompt_ids):
    model, tok = lively.model, lively.tokenizer
    results = run(lively, requests_for(prompt_ids, GREEDY), batch_size=3)
    for i, ids in enumerate(prompt_ids):
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),  # 5.0 infers one from the pad id
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        assert results[(f"r/{i}", 0)].token_ids == out[0, len(ids) :].tolist()


def test_greedy_with_n_repeats_one_generation(lively, prompt_ids):
    engine = HFEngine(lively.model, lively.tokenizer, batch_size=4, progress=False)
    reqs = requests_for(prompt_ids[:2], GREEDY, n=3)
    assert sum(len(b) for b in engine.plan(reqs)) == 2  # one row per greedy request
    results = run(lively, reqs)
    assert sorted(results) == [(f"r/{i}", s) for i in range(2) for s in range(3)]
    for i in range(2):
        assert results[(f"r/{i}", 0)] == dataclasses.replace(results[(f"r/{i}", 2)], sample=0)


# ---------------------------------------------------------------- sampling


def test_sampling_is_reproducible_and_leaves_the_global_rng_alone(lively, prompt_ids):
    reqs = requests_for(prompt_ids, SAMPLED, n=3, seed=7)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = run(lively, reqs)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # the global seed plays no part
    second = run(lively, reqs)
    assert tokens(first) == tokens(second)
    assert sorted(first) == [(f"r/{i}", s) for i in range(len(prompt_ids)) for s in range(3)]
    # the samples of one prompt differ from each other
    for i in range(len(prompt_ids)):
        assert len({tuple(first[(f"r/{i}", s)].token_ids) for s in range(3)}) == 3


@pytest.mark.parametrize("warped", [False, True])
def test_a_sample_depends_only_on_its_seed_id_and_index(warped, lively, prompt_ids):
    """Each (request, sample) draws from its own generator: the same tokens at any batch size, alone, in a
    batch with other requests (other prompt lengths, a greedy request) and when generated in two parts."""
    params = dataclasses.replace(SAMPLED, temperature=0.8, top_k=50, top_p=0.9) if warped else SAMPLED
    reqs = requests_for(prompt_ids, params, n=2, seed=5)
    reference = tokens(run(lively, reqs, batch_size=6))
    assert len({tuple(t) for t in reference.values()}) == len(reference)  # every sample differs
    for batch_size in (1, 3, 4):
        assert tokens(run(lively, reqs, batch_size=batch_size)) == reference
    for r in reqs[:3]:
        assert tokens(run(lively, [r], batch_size=1)) == {k: v for k, v in reference.items() if k[0] == r.id}
    others = requests_for(prompt_ids[::-1], params, n=3, seed=5, prefix="other")
    greedy = GenerationRequest("greedy", prompt_ids[1], dataclasses.replace(GREEDY, max_new_tokens=6))
    mixed = tokens(run(lively, [*others[:4], reqs[0], greedy, *reqs[1:], *others[4:]], batch_size=5))
    assert {k: v for k, v in mixed.items() if k[0].startswith("r/")} == reference
    # a resume generates the missing requests alone: the same samples as in one go
    assert (
        tokens({**run(lively, reqs[::2], batch_size=6), **run(lively, reqs[1::2], batch_size=6)}) == reference
    )


def test_sampling_draws_from_the_warped_distribution():
    """Rows whose scores give token A 0, token B log 3 and all others -1e4 draw from softmax(scores / T)
    after top-k and top-p: the frequency of A over 4000 rows matches its probability."""
    a, b, rows = 100, 200, 4000
    scores = torch.full((rows, 1000), -1e4)
    scores[:, a], scores[:, b] = 0.0, math.log(3)

    def frequency_of_a(**changes) -> float:
        sampler = RowSampler(SamplingParams(do_sample=True, **changes), seeds=range(rows))
        draws = sampler(torch.zeros(rows, 1, dtype=torch.long), scores.clone()).argmax(dim=-1).tolist()
        assert set(draws) <= {a, b}
        return draws.count(a) / rows

    # within 3.5 standard deviations (0.007 for 4000 draws at p = 0.25)
    assert frequency_of_a() == pytest.approx(0.25, abs=0.025)  # 1 / (1 + 3)
    assert frequency_of_a(temperature=2.0) == pytest.approx(1 / (1 + math.sqrt(3)), abs=0.025)
    assert frequency_of_a(temperature=0.5) == pytest.approx(0.1, abs=0.02)  # 1 / (1 + 9)
    assert frequency_of_a(top_p=0.8) == pytest.approx(0.25, abs=0.025)  # B alone holds 0.75 < 0.8
    assert frequency_of_a(top_k=2) == pytest.approx(0.25, abs=0.025)
    assert frequency_of_a(top_p=0.7) == 0.0  # B alone holds 0.75 >= 0.7
    assert frequency_of_a(top_k=1) == 0.0


def test_the_two_level_draw_inverts_the_cumulative_distribution():
    """`RowSampler.draw` picks what one float64 cumulative sum over the whole row picks for the same uniform
    numbers (vocabularies that are and are not a multiple of the block; half the tokens at probability 0)."""
    gen = torch.Generator().manual_seed(1)
    for vocab in (777, 3072):
        logits = torch.randn(256, vocab, generator=gen) * torch.linspace(0.5, 8, 256)[:, None]
        logits[torch.rand(256, vocab, generator=gen) < 0.5] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        seeds = range(vocab, vocab + 256)
        drawn = RowSampler(SamplingParams(do_sample=True), seeds).draw(probs).squeeze(1)
        uniform = torch.cat(
            [torch.rand(1, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
        )
        cdf = probs.double().cumsum(dim=-1)
        expected = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True).squeeze(1)
        assert torch.equal(drawn, expected)
        assert (probs[torch.arange(256), drawn] > 0).all()
        assert len(set(drawn.tolist())) > 100
    nan = torch.zeros(2, 300)
    nan[1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        RowSampler(SamplingParams(do_sample=True), seeds=[0, 1])(torch.zeros(2, 1, dtype=torch.long), nan)


def test_top_p_keeps_what_transformers_warper_keeps():
    """The sampler's top-p keeps what transformers' TopPLogitsWarper keeps, but for a boundary token whose
    decision is a float rounding (flat rows with thousands of tokens in the nucleus); searching the first
    candidates, the second or the whole row gives the same nucleus."""
    from transformers import TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 2, 5, 10, 20]).repeat_interleave(40)[:, None]
    scores = torch.randn(200, 6000, generator=gen) * scales
    ids = torch.zeros(200, 1, dtype=torch.long)
    kept, same = [], 0
    for top_p in (0.1, 0.5, 0.9, 0.99):
        sampler = RowSampler(SamplingParams(do_sample=True, top_p=top_p), seeds=range(200))
        ours = sampler.nucleus(scores.clone())
        theirs = TopPLogitsWarper(top_p)(ids, scores.clone())
        mine, hf = torch.isfinite(ours), torch.isfinite(theirs)
        same += int((ours == theirs).all(dim=-1).sum())
        assert ((mine & ~hf).sum(-1) + (hf & ~mine).sum(-1)).max() <= 1  # at most the boundary token
        assert torch.equal(ours[mine & hf], scores[mine & hf])
        sampler.candidates = ()
        assert torch.equal(sampler.nucleus(scores.clone()), ours)  # the whole row only: the same
        kept += hf.sum(-1).tolist()
    assert same >= 0.98 * 4 * 200
    first, second = RowSampler.candidates
    assert (
        min(kept) == 1 and sum(first < k <= second for k in kept) > 50 and sum(k > second for k in kept) > 20
    )


def test_top_k_one_sampling_is_greedy(lively, prompt_ids):
    greedy = tokens(run(lively, requests_for(prompt_ids, dataclasses.replace(GREEDY, max_new_tokens=6))))
    sampled = tokens(run(lively, requests_for(prompt_ids, dataclasses.replace(SAMPLED, top_k=1), n=2)))
    assert sampled == {(rid, s): greedy[(rid, 0)] for rid, _ in greedy for s in range(2)}


def test_a_different_seed_gives_different_samples(lively, prompt_ids):
    a = run(lively, requests_for(prompt_ids, SAMPLED, seed=0))
    b = run(lively, requests_for(prompt_ids, SAMPLED, seed=1))
    assert sum(a[k].token_ids != b[k].token_ids for k in a) >= len(a) - 1


def test_top_k_zero_is_the_full_vocabulary(tiny, prompt_ids):
    """transformers fills a top_k left out with 50: the engine must pass 0 to switch the filter off."""
    one = [GenerationRequest("p", prompt_ids[0], dataclasses.replace(SAMPLED, max_new_tokens=1), n=96)]
    full = {r.token_ids[0] for r in run(tiny, one, batch_size=96).values()}
    assert len(full) > 50  # the default model is close to uniform over ~49k tokens
    k5 = [dataclasses.replace(one[0], params=dataclasses.replace(one[0].params, top_k=5))]
    assert len({r.token_ids[0] for r in run(tiny, k5, batch_size=96).values()}) <= 5


def test_temperature_and_top_p_reach_generate(lively, prompt_ids):
    """Very low temperature or top_p makes sampling greedy."""
    greedy = tokens(run(lively, requests_for(prompt_ids, dataclasses.replace(GREEDY, max_new_tokens=6))))
    for params in (
        dataclasses.replace(SAMPLED, temperature=1e-4),
        dataclasses.replace(SAMPLED, top_p=1e-6),
    ):
        sampled = tokens(run(lively, requests_for(prompt_ids, params)))
        assert sampled == greedy


def test_the_model_generation_defaults_do_not_leak_in(tiny, prompt_ids):
    """Defaults in a model's generation_config.json (sampling, repetition penalties) do not change the
    decoding that SamplingParams asks for (the tiny model's greedy output repeats one token: a leaked
    no_repeat_ngram_size would change it)."""
    reqs = requests_for(prompt_ids, GREEDY)
    sampled_reqs = requests_for(prompt_ids, SAMPLED, n=2)
    greedy, sampled = tokens(run(tiny, reqs)), tokens(run(tiny, sampled_reqs))
    gen_cfg = tiny.model.generation_config
    saved = gen_cfg.to_dict()
    try:
        gen_cfg.update(
            do_sample=True,
            temperature=0.3,
            top_k=3,
            top_p=0.5,
            repetition_penalty=1.5,
            no_repeat_ngram_size=1,
        )
        assert tokens(run(tiny, reqs)) == greedy
        assert tokens(run(tiny, sampled_reqs)) == sampled
    finally:
        for key in (
            "do_sample",
            "temperature",
            "top_k",
            "top_p",
            "repetition_penalty",
            "no_repeat_ngram_size",
        ):
            setattr(gen_cfg, key, saved.get(key))


# ---------------------------------------------------------------- stopping


def test_max_new_tokens_and_finished(tiny_model_config, prompt_ids):
    """A token that the greedy continuation of prompt 0 emits at position 4 is made an extra EOS through
    the model's generation_config: that row stops there (EOS excluded, finished), rows without it run on."""
    arch = {**tiny_model_config.arch, "initializer_range": 0.3}
    loaded = load_model(
        dataclasses.replace(tiny_model_config, arch=arch)
    )  # a private copy: its config changes
    reqs = requests_for(prompt_ids, GREEDY)
    before = tokens(run(loaded, reqs))
    assert all(len(t) == 12 for t in before.values())
    row0 = before[("r/0", 0)]
    stop = next(t for j, t in enumerate(row0) if j >= 4 and t not in row0[:j])
    tok = loaded.tokenizer
    loaded.model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    assert eos_token_ids(loaded.model, tok) == [tok.eos_token_id, stop]

    after = run(loaded, reqs, batch_size=4)
    stops = {tok.eos_token_id, stop}
    for key, full in before.items():
        cut = next((j for j, t in enumerate(full) if t in stops), None)
        result = after[key]
        assert result.token_ids == (full if cut is None else full[:cut])
        assert result.finished is (cut is not None)
        assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)
    assert after[("r/0", 0)].finished and len(after[("r/0", 0)].token_ids) == row0.index(stop)
    assert any(not r.finished and len(r.token_ids) == 12 for r in after.values())


def test_eos_at_once_gives_an_empty_finished_result(tiny_model_config, prompt_ids):
    loaded = load_model(tiny_model_config)  # a private copy: its head changes
    head = loaded.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[loaded.tokenizer.eos_token_id] = 1e4
    loaded.model.lm_head = biased
    results = run(loaded, requests_for(prompt_ids[:3], SAMPLED, n=2))
    assert len(results) == 6
    assert all(r.token_ids == [] and r.text == "" and r.finished for r in results.values())


# ---------------------------------------------------------------- grouping and order


def test_mixed_params_are_grouped_and_each_gets_its_own(lively, prompt_ids):
    greedy = requests_for(prompt_ids, GREEDY, prefix="g")
    sampled = requests_for(prompt_ids, SAMPLED, n=2, prefix="s")
    mixed = [r for pair in zip(greedy, sampled) for r in pair]  # interleaved
    engine = HFEngine(lively.model, lively.tokenizer, batch_size=4, progress=False)
    for batch in engine.plan(mixed):
        assert len({r.params for r, _ in batch}) == 1
        assert [len(r.input_ids) for r, _ in batch] == sorted(
            (len(r.input_ids) for r, _ in batch), reverse=True
        )
    results = run(lively, mixed)
    assert tokens({k: v for k, v in results.items() if k[0].startswith("g/")}) == tokens(run(lively, greedy))
    assert tokens({k: v for k, v in results.items() if k[0].startswith("s/")}) == tokens(run(lively, sampled))
    for (rid, _), r in results.items():
        assert len(r.token_ids) <= (12 if rid.startswith("g/") else 6)
    assert any(len(r.token_ids) == 6 for (rid, _), r in results.items() if rid.startswith("s/"))


def test_results_come_batch_by_batch(lively, prompt_ids):
    engine = HFEngine(lively.model, lively.tokenizer, batch_size=2, progress=False)
    reqs = requests_for(prompt_ids, GREEDY)
    gen = engine.generate(reqs)
    first = [next(gen), next(gen)]
    assert {len(prompt_ids[int(r.id.split("/")[1])]) for r in first} == set(sorted(map(len, prompt_ids))[-2:])
    gen.close()  # stopping early is fine (the progress bar closes)


def test_requests_are_checked(lively, prompt_ids):
    engine = HFEngine(lively.model, lively.tokenizer, progress=False)
    with pytest.raises(ValueError, match="twice"):
        list(engine.generate(requests_for(prompt_ids[:1], GREEDY) * 2))
    with pytest.raises(ValueError, match="empty"):
        list(engine.generate([GenerationRequest("e", [], GREEDY)]))
    with pytest.raises(ValueError, match="n must be"):
        list(engine.generate([GenerationRequest("e", [1], GREEDY, n=0)]))
    assert list(engine.generate([])) == []


def test_training_mode_is_restored(lively, prompt_ids):
    lively.model.train()
    try:
        results = run(lively, requests_for(prompt_ids[:2], GREEDY))
        assert lively.model.training
    finally:
        lively.model.eval()
    assert tokens(results) == tokens(run(lively, requests_for(prompt_ids[:2], GREEDY)))


def test_progress_bar_counts_rows(lively, prompt_ids, capsys):
    engine = HFEngine(lively.model, lively.tokenizer, batch_size=4, progress=True)
    list(engine.generate(requests_for(prompt_ids[:2], SAMPLED, n=3)))
    assert "6/6" in capsys.readouterr().err


# ---------------------------------------------------------------- params, config, backends


def test_sampling_params():
    assert json.loads(json.dumps(SAMPLED.as_dict())) == {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": 6,
    }
    assert SamplingParams(True, 0.5, 0.9, 10, 32) == SamplingParams(
        do_sample=True, temperature=0.5, top_p=0.9, top_k=10, max_new_tokens=32
    )
    for bad in (
        {"max_new_tokens": 0},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"do_sample": True, "temperature": 0.0},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    SamplingParams(do_sample=False, temperature=0.0)  # greedy ignores the temperature


def test_stable_seed_is_stable():
    assert stable_seed([[0, "a", 1]]) == stable_seed([[0, "a", 1]])
    assert stable_seed([[0, "a", 1]]) != stable_seed([[0, "a", 2]])
    assert 0 <= stable_seed(0, "x") < 2**63


def test_default_params_and_make_engine(tiny):
    cfg = validate(
        compose_config(
            [
                "model=tiny",
                "logger=none",
                "generation.do_sample=true",
                "generation.top_k=5",
                "generation.batch_size=3",
            ]
        )
    )
    assert default_params(cfg.generation) == SamplingParams(True, 1.0, 1.0, 5, cfg.generation.max_new_tokens)
    engine = make_engine(cfg.generation, tiny)
    assert isinstance(engine, HFEngine) and engine.batch_size == 3


class FakeVLLM:
    """A stand-in for the vllm module: its LLM generates tokens from each request's seed (greedy: from the
    prompt) and records the params it was given."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        fake = self

        class LLM:
            def __init__(self, model, **kwargs):
                pass

            def generate(self, prompts, sampling_params, use_tqdm):
                fake.batches.append(list(sampling_params))
                outputs = []
                for prompt, params in zip(prompts, sampling_params):
                    assert params.n == 1
                    seed = params.seed if params.temperature > 0 else sum(prompt["prompt_token_ids"])
                    rng = random.Random(seed)
                    ids = [rng.randrange(100, 200) for _ in range(params.max_tokens)]
                    completion = SimpleNamespace(token_ids=ids, finish_reason="length", index=0)
                    outputs.append(SimpleNamespace(outputs=[completion]))
                return outputs

        self.LLM = LLM
        self.SamplingParams = lambda **kwargs: SimpleNamespace(**{"seed": None, **kwargs})


def test_vllm_samples_are_seeded_requests_of_their_own(tiny, monkeypatch):
    """Each sample of a sampled request is its own vLLM request seeded with stable_seed(seed, id, sample),
    as HFEngine's rows are: its tokens do not depend on the batch; a greedy request runs once."""
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    reqs = [
        GenerationRequest("a", [1, 2], SAMPLED, n=3, seed=4),
        GenerationRequest("g", [5], GREEDY, n=2),
        GenerationRequest("b", [3], SAMPLED, n=2, seed=4),
    ]

    def run_vllm(requests, batch_size):
        engine = VLLMEngine("some/model", tiny.tokenizer, batch_size=batch_size, progress=False, eos_ids=[2])
        return {(r.id, r.sample): r.token_ids for r in engine.generate(requests)}

    results = run_vllm(reqs, batch_size=2)
    assert [len(b) for b in fake.batches] == [2, 2, 2]  # 3 + 1 + 2 rows
    seeds = [p.seed for batch in fake.batches for p in batch]
    expected = (
        [stable_seed(4, "a", s) for s in range(3)] + [None] + [stable_seed(4, "b", s) for s in range(2)]
    )
    assert seeds == expected
    assert sorted(results) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("g", 0), ("g", 1)]
    assert results[("g", 0)] == results[("g", 1)]
    assert len({tuple(t) for k, t in results.items() if k[0] != "g"}) == 5
    assert run_vllm(reqs, batch_size=6) == results
    assert run_vllm(reqs[2:], batch_size=1) == {k: v for k, v in results.items() if k[0] == "b"}


def test_engine_stats_count_generated_tokens_and_time(lively, prompt_ids):
    engine = HFEngine(lively.model, lively.tokenizer, batch_size=4, progress=False)
    greedy = list(engine.generate(requests_for(prompt_ids[:2], GREEDY, n=3, prefix="g")))
    sampled = list(engine.generate(requests_for(prompt_ids, SAMPLED, n=2)))
    stats = engine.stats
    assert stats.sequences == 2 + len(sampled)  # a greedy request's repeated samples count once
    assert stats.new_tokens == sum(len(r.token_ids) for r in sampled + greedy[::3]) > 0
    assert stats.seconds > 0 and stats.tokens_per_s == pytest.approx(stats.new_tokens / stats.seconds)


def test_vllm_backend_without_vllm_names_the_extra(tiny):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    cfg = validate(compose_config(["model=tiny", "logger=none", "generation.backend=vllm"]))
    with pytest.raises(ImportError, match=r"pip install deepalign\[vllm\]"):
        make_engine(cfg.generation, tiny)


# ---------------------------------------------------------------- the demo model


@pytest.mark.slow
def test_demo_model_batched_greedy_equals_one_at_a_time():
    demo = load_model(validate(compose_config(["model=smollm2_135m_instruct", "logger=none"])).model)
    prompts = ["What is the capital of France?", "Give me one tip for sleeping well.", "Hi!"]
    ids = [encode_for_generation(demo.tokenizer, p) for p in prompts]
    reqs = requests_for(ids, GREEDY)
    batched, single = run(demo, reqs, batch_size=3), run(demo, reqs, batch_size=1)
    assert tokens(batched) == tokens(single)
    assert "Paris" in batched[("r/0", 0)].text


def test_generation_dtype_runs_generate_under_autocast(tiny, prompt_ids):
    """generation.dtype=bfloat16: the layers compute in bf16, the weights stay fp32."""
    seen = []
    layer = tiny.model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    try:
        cfg = GenerationConfig(dtype="bfloat16", max_new_tokens=2)
        engine = make_engine(cfg, tiny, progress=False)
        requests = [GenerationRequest("a", prompt_ids[0], SamplingParams(max_new_tokens=2))]
        assert len(list(engine.generate(requests))) == 1
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        list(make_engine(GenerationConfig(max_new_tokens=2), tiny, progress=False).generate(requests))
        assert set(seen) == {torch.float32}
    finally:
        handle.remove()
    assert layer.weight.dtype == torch.float32


def test_a_continuation_keeps_its_leading_space_after_a_sentencepiece_prefill(metaspace_tokenizer):
    """Decoded alone, a Metaspace decoder drops the first token's leading space: a prefilled "here is" and
    the model's "how ..." would be judged as "here ishow"."""
    from deepalign.generation import decode_continuation

    tok = metaspace_tokenizer
    context = tok("Sure, here is", add_special_tokens=False)["input_ids"]
    new = tok("Sure, here is how it goes", add_special_tokens=False)["input_ids"][len(context) :]
    assert tok.decode(new) == "how it goes"  # the bug: decoded alone
    text = decode_continuation(tok, context, new)
    assert text == " how it goes"
    assert tok.decode(context) + text == "Sure, here is how it goes"
    assert decode_continuation(tok, [], new) == "how it goes"
    assert decode_continuation(tok, context, []) == ""
