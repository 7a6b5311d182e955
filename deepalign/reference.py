"""Per-token reference log-probs: one no-grad pass of the initial model, cached on disk and reused.

The token-wise constrained loss needs log pi_aligned(y_t | x, y_<t) only for the target tokens, so one pass
before training replaces a second model in memory. The cache key covers the model (its weights' identity),
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
from deepalign.logprobs import pad_sequences, token_logprobs

log = logging.getLogger(__name__)


def _folder_stamp(folder: Path) -> list[tuple[str, int, int]]:
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".json", ".bin", ".model"))
    return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]


def model_fingerprint(cfg: ModelConfig, source: str, model) -> str:
    """Identity of the initial weights: their source (files' sizes and times, hub commit) and dtype."""
    parts: dict[str, object] = {"source": source, "revision": cfg.revision, "dtype": str(model.dtype)}
    parts["commit"] = getattr(model.config, "_commit_hash", None)
    if Path(source).is_dir():
        parts["files"] = _folder_stamp(Path(source))
    if cfg.source == "random":
        parts.update(arch=dict(cfg.arch), seed=cfg.seed, vocab=model.config.vocab_size)
    if cfg.adapter_path:
        parts["adapter"] = [cfg.adapter_path, _folder_stamp(Path(cfg.adapter_path))]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def data_fingerprint(encoded: list[EncodedChat]) -> str:
    """Identity of the tokenized training set (ids and label masks: template and max length included)."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.input_ids, [int(m) for m in e.labels_mask]]).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_reference_logps(
    model, encoded: list[EncodedChat], pad_id: int, batch_size: int = 8, autocast: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Per-token target log-probs (float32, aligned to input_ids; 0 at position 0) of every example.

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
        ids = pad_sequences(seqs, pad_id).to(device)
        attention = pad_sequences([[1] * len(s) for s in seqs], 0).to(device)
        with cast:
            logits = model(input_ids=ids, attention_mask=attention).logits
        logps = token_logprobs(logits, ids).float().cpu()
        for row, i in enumerate(idx):
            out[i] = logps[row, : len(encoded[i].input_ids)].clone()
    model.train(was_training)
    return out  # type: ignore[return-value]


def cached_reference_logps(
    model,
    encoded: list[EncodedChat],
    pad_id: int,
    cache_dir: str | Path,
    model_key: str,
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
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
            log.info("reference log-probs: cache hit %s", path)
            return torch.load(path), path, True
        logps = compute_reference_logps(model, encoded, pad_id, batch_size, autocast)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        torch.save(logps, tmp)
        os.replace(tmp, path)
        log.info("reference log-probs: computed and cached in %s", path)
        return logps, path, False
