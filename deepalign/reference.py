"""Per-token reference log-probs: one no-grad pass of the initial model, cached on disk and reused.

The token-wise constrained loss needs log pi_aligned(y_t | x, y_<t) only for the target tokens, so one pass
before training replaces a second model in memory. The cache key covers the model (its weights' contents),
the tokenized data (which already reflects template and max length), so a beta sweep computes it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock
from tqdm import tqdm

from deepalign.chat import EncodedChat
from deepalign.config import ModelConfig
from deepalign.logprobs import LOGPROB_CHUNK_MIB, pad_batch, target_logprobs
from deepalign.storage.digests import folder_digest

log = logging.getLogger(__name__)


def model_fingerprint(cfg: ModelConfig, source: str, model, cache_dir: str | Path | None = None) -> str:
    """Identity of loaded weights, by content: the files of the folder they came from (not the folder's
    path or file times: a re-saved identical model keeps it), or the hub id and commit, or a random model's
    architecture, seed and vocabulary; the adapter's files; the dtype; the attention implementation (eager
    and sdpa round differently). `cache_dir` keeps file digests."""
    parts: dict[str, object] = {"dtype": str(model.dtype), "attention": model.config._attn_implementation}
    if cfg.source == "random":
        parts.update(arch=dict(cfg.arch), seed=cfg.seed, vocab=model.config.vocab_size)
    elif Path(source).is_dir():
        parts["weights"] = folder_digest(source, cache_dir)
    else:
        parts.update(source=source, revision=cfg.revision, commit=getattr(model.config, "_commit_hash", None))
    if cfg.adapter_path:  # a local folder, or a hub id
        adapter = Path(cfg.adapter_path)
        parts["adapter"] = folder_digest(adapter, cache_dir) if adapter.is_dir() else cfg.adapter_path
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def data_fingerprint(encoded: list[EncodedChat]) -> str:
    """Identity of the tokenized training set (ids and label masks: template and max length included)."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.input_ids, [int(m) for m in e.labels_mask]]).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_reference_logps(
    model,
    encoded: list[EncodedChat],
    pad_id: int,
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
    chunk_mib: float = LOGPROB_CHUNK_MIB,
) -> list[torch.Tensor]:
    """Per-token log-probs of the target tokens (float32, aligned to input_ids; 0 off the targets) of every
    example, `chunk_mib` MiB of logits at a time (0: the model's full logits, every position scored).

    `autocast`: compute under torch.autocast in that dtype, as training will (train.bf16), so that at step 0
    the policy's log-probs equal the reference's and every token weight starts at exactly 1."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cast = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # less padding
    out: list[torch.Tensor | None] = [None] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc="reference log-probs", unit="batch"):
        idx = order[start : start + batch_size]
        seqs = [encoded[i].input_ids for i in idx]
        masks = [encoded[i].labels_mask for i in idx]
        padded = pad_batch(seqs, pad_id, labels_masks=masks, device=device)
        with cast:
            logps, _ = target_logprobs(
                model,
                padded.input_ids,
                attention_mask=padded.attention_mask,
                target_mask=padded.labels_mask,
                chunk_mib=chunk_mib,
            )
        logps = logps.float().cpu()
        for row, i in enumerate(idx):
            out[i] = logps[row, : len(encoded[i].input_ids)].clone()
    model.train(was_training)
    return out  # type: ignore[return-value]


def load_reference_cache(path: Path, encoded: list[EncodedChat]) -> tuple[list[torch.Tensor] | None, str]:
    """The cached log-probs if the file holds one finite float tensor per example, as long as the example;
    else (None, what is wrong)."""
    try:
        cached = torch.load(path, weights_only=True)
    except Exception as err:  # garbage, a truncated file, pickled objects that are not tensors
        return None, f"unreadable: {type(err).__name__}"
    if not isinstance(cached, list) or len(cached) != len(encoded):
        n = len(cached) if isinstance(cached, list) else type(cached).__name__
        return None, f"{n} entries for {len(encoded)} examples"
    for i, (t, e) in enumerate(zip(cached, encoded)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != (len(e.input_ids),):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return None, f"entry {i} is {shape}, not a float tensor of length {len(e.input_ids)}"
        if not bool(torch.isfinite(t).all()):
            return None, f"entry {i} is not finite"
    return cached, ""


def cached_reference_logps(
    model,
    encoded: list[EncodedChat],
    pad_id: int,
    cache_dir: str | Path,
    model_key: str,
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
    chunk_mib: float = LOGPROB_CHUNK_MIB,
) -> tuple[list[torch.Tensor], Path, bool]:
    """Reference log-probs from the cache when (model, data) match, else computed once and stored.

    Returns (log-probs, cache file, whether it was a cache hit). A file lock makes concurrent runs of a
    sweep wait for the first one's pass instead of repeating it.
    """
    root = Path(os.path.expanduser(str(cache_dir))) / "reference"
    root.mkdir(parents=True, exist_ok=True)
    precision = "" if autocast is None else "-" + str(autocast).removeprefix("torch.")
    path = root / f"{model_key}-{data_fingerprint(encoded)}{precision}.pt"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            cached, problem = load_reference_cache(path, encoded)
            if cached is not None:
                log.info("reference log-probs: cache hit %s", path)
                return cached, path, True
            log.warning("reference log-probs: ignoring the cache file %s (%s); recomputing it", path, problem)
        logps = compute_reference_logps(model, encoded, pad_id, batch_size, autocast, chunk_mib)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        torch.save(logps, tmp)
        os.replace(tmp, path)
        log.info("reference log-probs: computed and cached in %s", path)
        return logps, path, False
