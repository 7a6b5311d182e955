"""The generation engine behind every attack and evaluation: batched, seeded, resumable sampling.

Callers build `GenerationRequest`s (already chat-formatted prompt ids, see `chat.encode_for_generation`) and
iterate over `engine.generate(requests)`, which yields one `GenerationResult` per (request id, sample) batch
by batch, so each batch can be written to disk before the next one is computed (a killed run resumes from
the requests it has no results for).

Results come in **batch order, not input order**: requests are grouped by their `SamplingParams` (groups in
order of first appearance) and, within a group, sorted by prompt length (longest first, to cut padding and
to meet an out-of-memory error at the first batch). Key results by `(id, sample)`.

Sampling is reproducible: each sampled batch draws from an RNG seeded by a stable hash of its rows'
`(seed, id, sample)`, and the caller's global RNG state is left as it was. The same requests with the same
batch size give the same samples; a sample depends on the other rows of its batch, so a resumed run (which
batches only the missing requests) draws fresh, equally seeded, samples for those. Greedy requests with
`n > 1` are generated once and repeated.

Only the decoding settings of `SamplingParams` shape the distribution: defaults a model's own
`generation_config.json` may carry (Llama-3's temperature 0.6 / top_p 0.9, Qwen's repetition penalty,
transformers' implicit top_k=50) are overridden, so `top_k=0` really is the full vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from deepalign.logprobs import pad_sequences
from deepalign.models import DTYPES

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from deepalign.config import GenerationConfig
    from deepalign.models import LoadedModel

log = logging.getLogger(__name__)

VLLM_INSTALL_HINT = "pip install deepalign[vllm]"

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
    text: str  # decoded with skip_special_tokens=True
    finished: bool  # True if it stopped at EOS, False if it hit max_new_tokens


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


def _cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i], True
    return tokens, False


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


class HFEngine:
    """Batched, left-padded `model.generate` with the KV cache, on whatever device the model is on."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 16,
        progress: bool = True,
        autocast: torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.autocast = autocast  # run generate under torch.autocast in this dtype (weights stay as they are)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self._overrides = self._neutral_overrides()

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

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[GenerationResult]:
        """Yields results batch by batch (in batch order, not input order: key them by (id, sample))."""
        batches = self.plan(requests)
        total = sum(len(b) for b in batches)
        bar = tqdm(total=total, desc="generate", unit="seq", disable=not self.progress or total == 0)
        try:
            for batch in batches:
                sequences = self._run_batch(batch)
                results = []
                for (request, sample), seq in zip(batch, sequences):
                    tokens, finished = _cut_at_eos(seq, set(self.eos_ids))
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    copies = range(request.n) if not request.params.do_sample else [sample]
                    results.extend(
                        GenerationResult(request.id, s, list(tokens), text, finished) for s in copies
                    )
                bar.update(len(batch))
                yield from results
        finally:
            bar.close()

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(self._overrides)
        kwargs.update(
            max_new_tokens=params.max_new_tokens,
            do_sample=params.do_sample,
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        if params.do_sample:
            # All three always: a value left out is filled from the model's generation_config or from
            # transformers' defaults (top_k=50). top_k=0 switches the top-k filter off.
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        return kwargs

    def _run_batch(self, batch: list[tuple[GenerationRequest, int]]) -> list[list[int]]:
        """The new tokens of each row (up to max_new_tokens; after an EOS, padding)."""
        params = batch[0][0].params
        device = _model_device(self.model)
        prompts = [r.input_ids for r, _ in batch]
        input_ids = pad_sequences(prompts, self.pad_id, side="left").to(device)
        attention = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(device)
        kwargs = self._generate_kwargs(params)
        was_training = self.model.training
        self.model.eval()
        autocast = torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None)
        try:
            with torch.no_grad(), autocast:
                if params.do_sample:
                    seed = stable_seed([[r.seed, r.id, s] for r, s in batch])
                    forked = []
                    if device.type == "cuda":
                        forked = [device.index if device.index is not None else torch.cuda.current_device()]
                    with torch.random.fork_rng(devices=forked):
                        # Seed only the generators forked above: the CPU one and the model's GPU.
                        torch.random.default_generator.manual_seed(seed)
                        if device.type == "cuda":
                            with torch.cuda.device(device):
                                torch.cuda.manual_seed(seed)
                        out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
                else:
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
    end a sample. Each sampled request is seeded with a stable hash of its `(seed, id)`, so
    its samples do not depend on the rest of the batch. `kwargs` go to `vllm.LLM` (gpu_memory_utilization,
    max_model_len, tensor_parallel_size, ...).
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

    def _sampling_params(self, request: GenerationRequest) -> Any:
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
            n=request.n,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else -1,
            max_tokens=p.max_new_tokens,
            seed=stable_seed(request.seed, request.id),
            stop_token_ids=self.eos_ids,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[GenerationResult]:
        """Yields results batch by batch (batches of `batch_size` requests, in input order)."""
        _check_requests(requests)
        eos = set(self.eos_ids)
        for start in range(0, len(requests), self.batch_size):
            chunk = list(requests[start : start + self.batch_size])
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(r.input_ids)} for r in chunk],
                sampling_params=[self._sampling_params(r) for r in chunk],
                use_tqdm=self.progress,
            )
            results = []
            for request, output in zip(chunk, outputs):
                completions = sorted(output.outputs, key=lambda c: c.index)
                for i, completion in enumerate(completions):
                    tokens, finished = _cut_at_eos(list(completion.token_ids), eos)
                    finished = finished or completion.finish_reason == "stop"
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    samples = range(request.n) if not request.params.do_sample else [i]
                    results.extend(
                        GenerationResult(request.id, s, list(tokens), text, finished) for s in samples
                    )
            yield from results


def make_engine(
    cfg: GenerationConfig, loaded: LoadedModel, model_path: str | None = None, progress: bool = True
) -> HFEngine | VLLMEngine:
    """The engine of `generation.backend`. vLLM loads the weights itself, from `model_path` or else the
    folder or hub id the loaded model came from (the HF model stays loaded: free it first if GPU memory is
    short)."""
    if cfg.backend == "hf":
        autocast = DTYPES[cfg.dtype] if cfg.dtype in ("bfloat16", "float16") else None
        return HFEngine(
            loaded.model, loaded.tokenizer, batch_size=cfg.batch_size, progress=progress, autocast=autocast
        )
    if cfg.backend == "vllm":
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
