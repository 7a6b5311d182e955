"""The generation engine behind every attack and evaluation: batched, seeded, resumable sampling.

Callers build `GenerationRequest`s (already chat-formatted prompt ids, see `chat.encode_for_generation`) and
iterate over `engine.generate(requests)`, which yields one `GenerationResult` per (request id, sample) batch
by batch, so each batch can be written to disk before the next one is computed (a killed run resumes from
the requests it has no results for). `engine.stats` (a `GenerationStats`) adds up what it generated:
sequences, new tokens, seconds inside `generate` and their ratio `tokens_per_s`.

Results come in **batch order, not input order**: requests are grouped by their `SamplingParams` (groups in
order of first appearance) and, within a group, sorted by prompt length (longest first, to cut padding and
to meet an out-of-memory error at the first batch). Key results by `(id, sample)`.

Sampling is reproducible per row: sample `s` of request `id` draws its tokens from its own generator, seeded
by `stable_seed(seed, id, s)` and advanced once per generated token, so a sample depends on `(seed, id, s)`
(and the model) only: alone, in a mixed batch, at any batch size and after a resume it is the same. The
caller's global RNG state is left as it was. Greedy requests with `n > 1` are generated once and repeated.
Exactly the same holds where a row's logits do not depend on the rest of its batch; a device whose kernels
change a row's logits in the last bits with the batch shape can change a draw that lands within that noise
of the boundary between two tokens (as it can flip a near-tie under greedy decoding). `HFEngine` and
`VLLMEngine` seed each sample with the same `stable_seed(seed, id, s)`, but their kernels and RNGs differ:
the two backends do not give the same tokens.

Only the decoding settings of `SamplingParams` shape the distribution: defaults a model's own
`generation_config.json` may carry (Llama-3's temperature 0.6 / top_p 0.9, Qwen's repetition penalty,
transformers' implicit top_k=50) are overridden, so `top_k=0` really is the full vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from deepalign.logprobs import cache_kwarg, pad_batch, unwrap
from deepalign.precision import generation_autocast

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from deepalign.config import GenerationConfig
    from deepalign.models import LoadedModel

log = logging.getLogger(__name__)

VLLM_INSTALL_HINT = "pip install deepalign[vllm]"

# HFEngine's KV caches: transformers' default (grows as it decodes), or "static", one allocated up front and
# kept by the engine, with which `generate` compiles the decoding step (torch.compile, CUDA graphs) on CUDA.
CACHE_IMPLEMENTATIONS = ("dynamic", "static")

# Decoding settings a model's generation_config.json may set, and the value that switches each off. They are
# passed to `generate` only when the model's config sets something else, so the usual call stays warning-free.
_NEUTRAL_DEFAULTS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "min_p": 0.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_length": 0,
    "min_new_tokens": 0,
    "num_beams": 1,
}


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. With `do_sample=False` (greedy) temperature, top_p and top_k are ignored."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature} (greedy: do_sample=False)"
            )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (for artifacts)."""
        return dataclasses.asdict(self)


@dataclass
class GenerationRequest:
    id: str  # the caller's key (e.g. "prefill/k=10/17")
    input_ids: list[int]  # already chat-formatted (encode_for_generation), no padding
    params: SamplingParams
    n: int = 1  # samples for this prompt
    seed: int = 0


@dataclass
class GenerationResult:
    id: str
    sample: int  # 0..n-1
    token_ids: list[int]  # new tokens only, stopped at EOS (EOS itself excluded), no padding
    text: str  # what the tokens add to the prompt's text (`decode_continuation`), special tokens skipped
    finished: bool  # True if it stopped at EOS, False if it hit max_new_tokens


@dataclass
class GenerationStats:
    """What an engine generated so far: sequences, new tokens (EOS excluded) and seconds spent generating.

    A greedy request with `n > 1` counts once: it is generated once and its result repeated.
    """

    sequences: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, token_counts: Sequence[int], seconds: float) -> None:
        """Count a batch: the new tokens of each sequence it generated, and its wall time."""
        self.sequences += len(token_counts)
        self.new_tokens += sum(token_counts)
        self.seconds += seconds


def default_params(cfg: GenerationConfig) -> SamplingParams:
    """The sampling settings of the `generation` config group (`num_samples` is the requests' `n`)."""
    return SamplingParams(
        do_sample=cfg.do_sample,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
    )


def _check_requests(requests: Sequence[GenerationRequest]) -> None:
    seen: set[str] = set()
    for r in requests:
        if not r.input_ids:
            raise ValueError(f"request {r.id!r}: input_ids is empty")
        if r.n < 1:
            raise ValueError(f"request {r.id!r}: n must be >= 1, got {r.n}")
        if r.id in seen:
            raise ValueError(f"request id {r.id!r} appears twice; results are keyed by (id, sample)")
        seen.add(r.id)


def stable_seed(*parts: Any) -> int:
    """A seed in [0, 2**63) from a JSON-able value, the same in every process and Python version."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def eos_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS id plus every `generation_config.eos_token_id` of the model (an int or a list)."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        candidates.append(gen_cfg.eos_token_id)
    for c in candidates:
        if c is None:
            continue
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config names an EOS token")
    return ids


def decode_continuation(
    tokenizer: PreTrainedTokenizerBase, context: Sequence[int], tokens: Sequence[int]
) -> str:
    """The text `tokens` add after `context`: decoded after the context's last token, whose own text is then
    removed. Decoded alone, a SentencePiece-style (Metaspace) decoder drops the first new token's leading
    space, and a prefilled "... here is" would read "here ishow" to the judges."""
    plain = tokenizer.decode(list(tokens), skip_special_tokens=True)
    if not tokens or not context:
        return plain
    anchor = tokenizer.decode(list(context[-1:]), skip_special_tokens=True)
    joined = tokenizer.decode([*context[-1:], *tokens], skip_special_tokens=True)
    return joined[len(anchor) :] if joined.startswith(anchor) else plain


def _cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i], True
    return tokens, False


def _exact_dtype(device: torch.device) -> torch.dtype:
    """float64 for the sampler's cumulative sums (float32 on mps, which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


class RowSampler:
    """A logits processor that samples each row from its own generator, for a greedy `model.generate`.

    The scores are warped as transformers' sampling does: temperature, then top-k (transformers' own warpers),
    then top-p (`nucleus`: what transformers' TopPLogitsWarper keeps); top_k=0 and top_p=1 are off. Then one
    uniform number from the row's generator picks the row's token by inverting the cumulative distribution
    (`draw`), and the returned scores are -inf except at that token, which greedy selection therefore picks.
    Each generator advances once per step, so a row's tokens depend on its seed and its logits only, not on
    the other rows.
    """

    # Top-p looks for the nucleus among each row's 256 highest scores, then 4096, before the whole row:
    # transformers' warper sorts the whole vocabulary, which on a CPU costs about a decoding step of a small
    # model, and most nuclei are far smaller.
    candidates: tuple[int, ...] = (256, 4096)
    block = 256  # tokens per block of `draw`'s two-level search

    def __init__(self, params: SamplingParams, seeds: Sequence[int]) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper

        self.warpers: list[Any] = []
        if params.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        self.top_p = params.top_p
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"RowSampler has {len(self.generators)} generators for {scores.shape[0]} rows")
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        if self.top_p < 1.0:
            scores = self.nucleus(scores)
        probs = torch.softmax(scores, dim=-1)
        tokens = self.draw(probs)
        return probs.fill_(float("-inf")).scatter_(1, tokens, 0.0)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """Each row's token (a column): the first whose cumulative probability exceeds the row's uniform
        number times the row's total, which is a token of probability > 0. Searched over blocks of `block`
        tokens, then inside the block the number falls in, in float64 (a cumulative sum over the whole
        vocabulary is a slow sequential scan on a CPU)."""
        rows, vocab = probs.shape
        exact = _exact_dtype(probs.device)
        below_one = 1 - torch.finfo(exact).eps
        masses = probs.unfold(1, self.block, self.block).sum(dim=-1)
        if vocab % self.block:
            rest = probs[:, masses.shape[1] * self.block :].sum(dim=-1, keepdim=True)
            masses = torch.cat([masses, rest], dim=1)
        cdf = masses.to(exact).cumsum(dim=-1)
        total = cdf[:, -1]
        if not bool(((total > 0) & torch.isfinite(total)).all()):
            raise ValueError("sampling: the model's logits for a row are NaN or infinite (no distribution)")
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        target = uniform.to(device=cdf.device, dtype=exact).clamp_(max=below_one).unsqueeze(1) * cdf[:, -1:]
        block = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
        before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
        share = ((target - before) / (cdf.gather(1, block) - before)).clamp_(min=0.0, max=below_one)
        columns = block * self.block + torch.arange(self.block, device=probs.device)
        inside = probs.gather(1, columns.clamp(max=vocab - 1)).masked_fill(columns >= vocab, 0.0)
        inner = inside.to(exact).cumsum(dim=-1)
        offset = torch.searchsorted(inner, share * inner[:, -1:], right=True).clamp_(max=self.block - 1)
        return block * self.block + offset

    # Our own top-p: transformers' TopPLogitsWarper sorts every row at every step (1.74x greedy's time).
    def nucleus(self, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Top-p as transformers' TopPLogitsWarper: a row keeps its most probable tokens while the probability
        of the tokens above them is below top_p (the top one always), the others get -inf. Looked for among
        the row's k highest scores for each k of `candidates` (done once they hold top_p), then the whole row.
        """
        vocab = scores.shape[-1]
        total = scores.logsumexp(dim=-1, keepdim=True)
        out = torch.full_like(scores, float("-inf"))
        todo = torch.arange(scores.shape[0], device=scores.device)  # the rows whose nucleus is not found yet
        for k in (*(c for c in self.candidates if c < vocab), vocab):
            top, index = scores[todo].topk(k, dim=-1)  # highest first
            mass = (top - total[todo]).exp().cumsum(dim=-1, dtype=_exact_dtype(scores.device))
            above = torch.nn.functional.pad(mass[:, :-1], (1, 0))
            found = (mass[:, -1] >= self.top_p) | (k == vocab)
            nucleus = top.masked_fill(above >= self.top_p, float("-inf"))
            out[todo[found]] = out[todo[found]].scatter_(1, index[found], nucleus[found])
            todo = todo[~found]
            if len(todo) == 0:
                break
        return out


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@dataclass
class _Row:
    """One sequence to decode: its params and ids, and the (request, sample) pairs whose result it is."""

    params: SamplingParams | None  # None: a root from the context, never decoded
    input_ids: list[int]
    copies: list[tuple[GenerationRequest, int]]


@dataclass
class _Family:
    """Rows whose ids start the first row's (its root, the longest): decoded from the root's KV cache."""

    rows: list[_Row]


@dataclass
class _Prefix:
    """The KV cache of a batch of roots' ids but their last token, left-padded; `starts`: each root's first
    column."""

    cache: Any
    ids: torch.Tensor
    starts: list[int]


def prefix_families(rows: Sequence[_Row]) -> list[_Family]:
    """The rows grouped under roots: each row joins the first root (longest first, then by ids) whose ids
    start with its ids, else it is a new root. Families come longest root first. A prefilling attack's
    depths nest, so each item's deepest prefill is the root of its shallower ones and of its plain request."""
    trie: dict[int, Any] = {}  # token -> child node; key -1: the family that made the node
    families: list[_Family] = []
    for row in sorted(rows, key=lambda r: (-len(r.input_ids), r.input_ids)):  # whatever the rows' order
        node = trie
        for token in row.input_ids:
            node = node.get(token)
            if node is None:
                break
        if node is not None:
            families[node[-1]].rows.append(row)
            continue
        node = trie
        for token in row.input_ids:
            node = node.setdefault(token, {-1: len(families)})
        families.append(_Family([row]))
    return families


def compact_cache(cache: Any, index: torch.Tensor, begins: torch.Tensor, lengths: torch.Tensor) -> Any:
    """A new DynamicCache whose row j holds `lengths[j]` columns of `cache`'s row `index[j]` from column
    `begins[j]` on, left-padded (with copies of a column, which the attention mask hides) to the longest:
    a row attends over its own tokens only, not over the longer root's width.

    Written here: transformers' caches copy or crop whole batches, not a slice per row."""
    from transformers import DynamicCache

    width = int(lengths.max())
    offset = torch.arange(width, device=index.device) - width  # -width .. -1: right-aligned columns
    columns = (begins + lengths).unsqueeze(1) + offset  # [rows, width]
    columns = torch.maximum(columns, begins.unsqueeze(1))  # the padding repeats a row's first column
    rows = index.unsqueeze(1)
    out = DynamicCache()
    for layer, kept in enumerate(cache.layers):
        if kept.keys.shape[2] < int(columns.max()) + 1:  # a sliding-window layer dropped early columns
            raise ValueError(
                f"generation.share_prefixes: layer {layer} of the KV cache keeps {kept.keys.shape[2]} of the "
                f"{int(columns.max()) + 1} columns of its prefix (a sliding window); set "
                "generation.share_prefixes=false"
            )
        keys, values = (t.transpose(1, 2)[rows, columns].transpose(1, 2) for t in (kept.keys, kept.values))
        out.update(keys.contiguous(), values.contiguous(), layer)
    return out


class KeptStaticCache:
    """One transformers `StaticCache` kept for many `generate` calls and reset before each: made anew only for
    another number of rows or a longer sequence than it holds. A compiled decoding step's CUDA graphs are
    recorded for the tensors of one cache (with `cache_implementation="static"`, `generate` makes a new
    cache per call, and the graphs are recorded again)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._kept: tuple[int, int, Any] | None = None  # (rows, length, StaticCache)

    def get(self, rows: int, length: int) -> Any:
        """A reset StaticCache for `rows` sequences of up to `length` tokens (prompt and new tokens)."""
        from transformers import StaticCache

        if self._kept is None or self._kept[0] != rows or self._kept[1] < length:
            self._kept = None  # the old cache's memory goes before the new one is filled
            config = unwrap(self.model).config
            self._kept = (rows, length, StaticCache(config=config, max_cache_len=length))
        cache = self._kept[2]
        cache.reset()
        return cache


class HFEngine:
    """Batched, left-padded `model.generate` with the KV cache, on whatever device the model is on.

    `cache="static"` decodes into a pre-allocated KV cache (transformers' `StaticCache`), with which
    `generate` compiles the decoding step on a CUDA device (torch.compile, CUDA graphs); elsewhere it runs
    uncompiled. The engine keeps one (`KeptStaticCache`) across batches and calls, sized for the longest
    batch of a call (prompt + max_new_tokens).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 16,
        progress: bool = True,
        autocast: torch.dtype | None = None,
        cache: str = "dynamic",
        share_prefixes: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cache not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"cache must be one of {', '.join(CACHE_IMPLEMENTATIONS)}, got {cache!r}")
        self.model = model
        self.cache = cache  # the KV cache implementation (see CACHE_IMPLEMENTATIONS)
        self.autocast = autocast  # run generate under torch.autocast in this dtype (weights stay as they are)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self._overrides = self._neutral_overrides()
        self.stats = GenerationStats()
        self._static = KeptStaticCache(model)
        # with the dynamic cache: rows whose ids start another row's are decoded from that row's KV cache
        self.share_prefixes = share_prefixes and cache == "dynamic"

    def _neutral_overrides(self) -> dict[str, Any]:
        gen_cfg = getattr(self.model, "generation_config", None)
        overrides = {}
        for key, neutral in _NEUTRAL_DEFAULTS.items():
            value = getattr(gen_cfg, key, None)
            if value is not None and value != neutral:
                overrides[key] = neutral
        if overrides:
            log.info("generation: overriding the model's generation_config defaults %s", sorted(overrides))
        return overrides

    def plan(self, requests: Sequence[GenerationRequest]) -> list[list[tuple[GenerationRequest, int]]]:
        """The batches `generate` will run, in order: lists of (request, sample) rows with equal params.

        Greedy requests get one row (sample 0), whose result is repeated for their other samples.
        """
        _check_requests(requests)
        groups: dict[SamplingParams, list[tuple[GenerationRequest, int]]] = {}
        for r in requests:
            rows = groups.setdefault(r.params, [])
            rows.extend((r, s) for s in range(r.n if r.params.do_sample else 1))
        batches = []
        for rows in groups.values():
            rows.sort(key=lambda row: -len(row[0].input_ids))  # stable: a request's samples stay together
            batches.extend(rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size))
        return batches

    def generate(
        self, requests: Sequence[GenerationRequest], context: Sequence[Sequence[int]] = ()
    ) -> Iterator[GenerationResult]:
        """Yields results batch by batch (in batch order, not input order: key them by (id, sample)).

        With `share_prefixes`, greedy requests are decoded from prefix families (`prefix_families`): one
        forward pass over a family's longest ids, whose KV cache every member decodes from. `context`: the ids
        of the other greedy requests of the same computation (e.g. a stage's, generated or not), which may
        be roots without being decoded, so that a request's root, and so its tokens to the last bit, does not
        depend on which requests are still to generate (a resume).
        """
        _check_requests(requests)
        share = self.share_prefixes and all(len(r.input_ids) > 1 for r in requests)
        greedy = [r for r in requests if share and not r.params.do_sample]
        plain = [r for r in requests if not (share and not r.params.do_sample)]
        families = prefix_families(self._rows(greedy, context)) if greedy else []
        total = sum(len(b) for b in self.plan(plain)) + sum(1 for f in families for r in f.rows if r.copies)
        bar = tqdm(total=total, desc="generate", unit="seq", disable=not self.progress or total == 0)
        eos = set(self.eos_ids)
        try:
            for batch, run in [*self._shared_batches(families), *self._plain_batches(plain)]:
                start = time.perf_counter()
                sequences = run()
                results, counts = [], []
                for row, seq in zip(batch, sequences):
                    tokens, finished = _cut_at_eos(seq, eos)
                    for request, sample in row.copies:
                        text = decode_continuation(self.tokenizer, request.input_ids, tokens)
                        copies = range(request.n) if not request.params.do_sample else [sample]
                        results.extend(
                            GenerationResult(request.id, s, list(tokens), text, finished) for s in copies
                        )
                    counts.append(len(tokens))
                self.stats.add(counts, time.perf_counter() - start)
                bar.update(len(batch))
                yield from results
        finally:
            bar.close()

    def _rows(self, greedy: Sequence[GenerationRequest], context: Sequence[Sequence[int]]) -> list[_Row]:
        """One row per distinct (params, ids) of the greedy requests, the result of each request with them,
        and, for ids of `context` that no request has, a row without requests (a root, never decoded)."""
        rows: dict[tuple, _Row] = {}
        for r in greedy:
            rows.setdefault((r.params, tuple(r.input_ids)), _Row(r.params, r.input_ids, [])).copies.append(
                (r, 0)
            )
        known = {ids for _, ids in rows}
        extra = {tuple(ids) for ids in context if len(ids) > 1} - known
        return list(rows.values()) + [_Row(None, list(ids), []) for ids in sorted(extra)]

    def _plain_batches(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[list[_Row], Any]]:
        """`plan`'s batches, each decoded from its own left-padded prompts."""
        batches = self.plan(requests)
        longest = max((len(b[0][0].input_ids) + b[0][0].params.max_new_tokens for b in batches), default=0)
        for batch in batches:
            rows = [_Row(r.params, r.input_ids, [(r, s)]) for r, s in batch]
            yield rows, lambda batch=batch: self._run_batch(batch, longest)

    def _shared_batches(self, families: list[_Family]) -> Iterator[tuple[list[_Row], Any]]:
        """For `batch_size` families at a time, one forward pass over their roots' ids (all but the last
        token) makes a KV cache, from which each of their rows with requests is decoded, in batches of equal
        params: a row attends to its root's cached positions up to its own length only."""
        device = _model_device(self.model)
        families = [f for f in families if any(r.copies for r in f.rows)]
        for start in range(0, len(families), self.batch_size):
            chunk = families[start : start + self.batch_size]
            roots = [f.rows[0] for f in chunk]
            prefix: list[_Prefix] = []  # made when the chunk's first batch runs
            rows = sorted(
                ((i, row) for i, f in enumerate(chunk) for row in f.rows if row.copies),
                key=lambda x: (str(x[1].params), -len(x[1].input_ids)),
            )
            batches: list[list[tuple[int, _Row]]] = []
            for i, row in rows:
                last = batches[-1] if batches else None
                if last and len(last) < self.batch_size and last[0][1].params == row.params:
                    last.append((i, row))
                else:
                    batches.append([(i, row)])
            for batch in batches:

                def run(batch=batch, roots=roots, prefix=prefix) -> list[list[int]]:
                    if not prefix:
                        prefix.append(self._prefix(roots, device))
                    return self._run_shared(batch, prefix[0], device)

                yield [row for _, row in batch], run

    def _autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def _prefix(self, roots: list[_Row], device: torch.device) -> _Prefix:
        """The KV cache of the roots' ids but their last token, left-padded (position ids from the mask)."""
        padded = pad_batch([r.input_ids[:-1] for r in roots], self.pad_id, side="left", device=device)
        mask = padded.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast(device):
                out = self.model(
                    input_ids=padded.input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                )
        finally:
            self.model.train(was_training)
        width = padded.input_ids.shape[1]
        starts = [width - len(r.input_ids) + 1 for r in roots]
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5.2x
        return _Prefix(cache, padded.input_ids, starts)

    def _run_shared(
        self, batch: list[tuple[int, _Row]], prefix: _Prefix, device: torch.device
    ) -> list[list[int]]:
        """Decode rows from their roots' cache (`batch`: root index, row): each row gets the cached columns of
        its own ids but the last (`compact_cache`), left-padded to the batch's longest, and its last token is
        the one new input."""
        padded = pad_batch([row.input_ids for _, row in batch], self.pad_id, side="left", device=device)
        index = torch.tensor([i for i, _ in batch], device=device)
        begins = torch.tensor([prefix.starts[i] for i, _ in batch], device=device)
        lengths = padded.attention_mask[:, :-1].sum(-1)  # the cached tokens of each row
        cache = compact_cache(prefix.cache, index, begins, lengths)
        extra = {cache_kwarg(self.model): cache}
        return self._decode(padded.input_ids, padded.attention_mask, batch[0][1].params, [], device, extra)

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(self._overrides)
        # Always greedy selection: sampled rows draw their tokens in a RowSampler (see `_run_batch`), which
        # applies exactly the params' temperature, top_k and top_p; under greedy selection transformers runs
        # none of its sampling warpers, whatever the model's generation_config says.
        kwargs.update(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        return kwargs

    def _run_batch(self, batch: list[tuple[GenerationRequest, int]], longest: int) -> list[list[int]]:
        """The new tokens of each row (up to max_new_tokens; after an EOS, padding). `longest`: prompt and new
        tokens of the call's longest batch (each batch's first prompt is its longest, see `plan`), the length
        of a static cache."""
        device = _model_device(self.model)
        padded = pad_batch([r.input_ids for r, _ in batch], self.pad_id, side="left", device=device)
        extra = {}
        if self.cache == "static":
            extra[cache_kwarg(self.model)] = self._static.get(len(batch), longest)
        seeds = [stable_seed(r.seed, r.id, s) for r, s in batch]
        return self._decode(padded.input_ids, padded.attention_mask, batch[0][0].params, seeds, device, extra)

    def _decode(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        params: SamplingParams,
        seeds: list[int],
        device: torch.device,
        extra: dict[str, Any],
    ) -> list[list[int]]:
        """`model.generate` on one batch: the new tokens of each row (sampled rows through a RowSampler)."""
        kwargs = {**self._generate_kwargs(params), **extra}
        if params.do_sample:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([RowSampler(params, seeds)])
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast(device):
                out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        finally:
            self.model.train(was_training)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return sequences[:, input_ids.shape[1] :].tolist()


def _saved_generation_config(model_path: str) -> Any:
    """The generation_config.json of a folder or hub id, or None."""
    from transformers import GenerationConfig as HFGenerationConfig

    try:
        return HFGenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


class VLLMEngine:
    """The same interface on vLLM (continuous batching; needs a GPU and `pip install deepalign[vllm]`).

    The weights are loaded by vLLM from `model_path` (an HF folder or hub id); `tokenizer` decodes the results
    so texts match `HFEngine`'s; `eos_ids` (default: the tokenizer's and the folder's generation_config's)
    end a sample. Each sample of a sampled request is a vLLM request of its own, seeded with
    `stable_seed(seed, id, sample)` like `HFEngine`'s rows (the tokens still differ from `HFEngine`'s: other
    kernels, another RNG), so it does not depend on the rest of the batch. `kwargs` go to `vllm.LLM`
    (gpu_memory_utilization, max_model_len, tensor_parallel_size, ...).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 256,
        dtype: str = "auto",
        seed: int = 0,
        progress: bool = True,
        eos_ids: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                f"generation.backend=vllm needs vLLM, which is not installed: {VLLM_INSTALL_HINT} "
                "(or use generation.backend=hf)"
            ) from exc
        if not model_path:
            raise ValueError(
                "generation.backend=vllm loads the weights itself and needs a model folder or hub id; "
                "a randomly initialised model (model.source=random) has none: use generation.backend=hf"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.llm = vllm.LLM(model=str(model_path), dtype=dtype, seed=seed, **kwargs)
        if eos_ids is None:
            eos_ids = eos_token_ids(
                SimpleNamespace(generation_config=_saved_generation_config(model_path)), tokenizer
            )
        self.eos_ids = list(eos_ids)
        self.stats = GenerationStats()

    def _sampling_params(self, request: GenerationRequest, sample: int) -> Any:
        """vLLM's params for one row: greedy (its result repeated for every sample) or one seeded sample."""
        p = request.params
        if not p.do_sample:
            return self._vllm.SamplingParams(
                n=1,
                temperature=0.0,
                top_p=1.0,
                top_k=-1,
                max_tokens=p.max_new_tokens,
                stop_token_ids=self.eos_ids,
            )
        return self._vllm.SamplingParams(
            n=1,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else -1,
            max_tokens=p.max_new_tokens,
            seed=stable_seed(request.seed, request.id, sample),
            stop_token_ids=self.eos_ids,
        )

    def generate(
        self, requests: Sequence[GenerationRequest], context: Sequence[Sequence[int]] = ()
    ) -> Iterator[GenerationResult]:
        """Yields results batch by batch (batches of `batch_size` rows, in input order): a row is one sample
        of a sampled request, or a greedy request (generated once, its result repeated for its samples).
        `context` is for the interface's sake: vLLM caches prefixes itself (automatic prefix caching)."""
        _check_requests(requests)
        eos = set(self.eos_ids)
        rows = [(r, s) for r in requests for s in range(r.n if r.params.do_sample else 1)]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            began = time.perf_counter()
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(r.input_ids)} for r, _ in chunk],
                sampling_params=[self._sampling_params(r, s) for r, s in chunk],
                use_tqdm=self.progress,
            )
            results, counts = [], []
            for (request, sample), output in zip(chunk, outputs):
                completion = output.outputs[0]
                tokens, finished = _cut_at_eos(list(completion.token_ids), eos)
                finished = finished or completion.finish_reason == "stop"
                text = decode_continuation(self.tokenizer, request.input_ids, tokens)
                samples = range(request.n) if not request.params.do_sample else [sample]
                results.extend(GenerationResult(request.id, s, list(tokens), text, finished) for s in samples)
                counts.append(len(tokens))
            self.stats.add(counts, time.perf_counter() - began)
            yield from results


def make_engine(
    cfg: GenerationConfig,
    loaded: LoadedModel,
    model_path: str | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
) -> HFEngine | VLLMEngine:
    """The engine of `generation.backend`. vLLM loads the weights itself, from `model_path` or else the
    folder or hub id the loaded model came from (the HF model stays loaded: free it first if GPU memory is
    short) and ignores `generation.cache`. `generation.dtype=auto` asks `deepalign.precision` (its probe
    cached in `cache_dir`, default the default `paths.cache_dir`) whether an fp32 model generates under bf16
    autocast."""
    if cfg.backend == "hf":
        device = _model_device(loaded.model)
        model_dtype = getattr(loaded.model, "dtype", torch.float32)
        autocast = generation_autocast(cfg.dtype, model_dtype, device, cache_dir)
        return HFEngine(
            loaded.model,
            loaded.tokenizer,
            batch_size=cfg.batch_size,
            progress=progress,
            autocast=autocast,
            cache=cfg.cache,
            share_prefixes=cfg.share_prefixes,
        )
    if cfg.backend == "vllm":
        if cfg.cache != "dynamic":
            log.info("generation.cache=%s is for the hf backend; vLLM manages its own KV cache", cfg.cache)
        path = model_path or (None if loaded.source.startswith("random:") else loaded.source)
        dtype = cfg.dtype
        if dtype == "auto":
            dtype = str(getattr(loaded.model, "dtype", "auto")).removeprefix("torch.")
        return VLLMEngine(
            path,
            loaded.tokenizer,
            batch_size=cfg.batch_size,
            dtype=dtype,
            progress=progress,
            eos_ids=eos_token_ids(loaded.model, loaded.tokenizer),
        )
    raise ValueError(f"generation.backend: {cfg.backend!r} is not hf or vllm")
