"""The `probe` stage: how well the model predicts reference answers, and what it says when asked.

Teacher-forced NLL over the assistant tokens of reference chats (through the chat template and its label
mask), then batched greedy generation for the same prompts. A short real run of the whole foundation.
"""

from __future__ import annotations

import json
import time

import torch
from tqdm import tqdm

from deepalign.chat import encode_for_generation, encode_for_training
from deepalign.config import DataComponent, ProbeConfig
from deepalign.context import RunContext
from deepalign.data import read_component
from deepalign.logprobs import pad_batch, target_logprobs
from deepalign.plugins import register_stage
from deepalign.storage.atomic import write_text_atomic


def load_chats(name: str) -> list[dict[str, str]]:
    """Chats (prompt, response, id) from a local JSONL file or a packaged demo set (demo:<name>)."""
    comp = DataComponent(source=name, schema="chat")
    rows = read_component(comp, "probe.chats")
    return [{"id": str(i), **row} for i, row in enumerate(rows)]


@torch.no_grad()
@register_stage("probe", sections=("model", "probe", "data.system_prompt"), config=ProbeConfig)
def run_probe(ctx: RunContext) -> dict[str, float]:
    cfg = ctx.config.probe
    chats = load_chats(cfg.chats)
    loaded = ctx.model()
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    system = ctx.config.data.system_prompt

    nll_sum, n_tokens = 0.0, 0
    for start in tqdm(range(0, len(chats), cfg.batch_size), desc="probe nll", unit="batch"):
        batch = [
            encode_for_training(tokenizer, c["prompt"], c["response"], system=system)
            for c in chats[start : start + cfg.batch_size]
        ]
        padded = pad_batch(
            [e.input_ids for e in batch],
            tokenizer.pad_token_id,
            labels_masks=[e.labels_mask for e in batch],
            device=device,
        )
        ids, mask = padded.input_ids, padded.labels_mask
        logps, _ = target_logprobs(model, ids, attention_mask=padded.attention_mask, target_mask=mask)
        nll_sum -= logps[mask].sum().item()
        n_tokens += int(mask.sum())

    rows, new_tokens, gen_seconds = [], 0, 0.0
    for start in tqdm(range(0, len(chats), cfg.batch_size), desc="probe generate", unit="batch"):
        part = chats[start : start + cfg.batch_size]
        prompts = [encode_for_generation(tokenizer, c["prompt"], system=system) for c in part]
        padded = pad_batch(prompts, tokenizer.pad_token_id, side="left", device=device)
        ids = padded.input_ids
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=padded.attention_mask,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        gen_seconds += time.perf_counter() - t0
        for chat, seq in zip(part, out[:, ids.shape[1] :].tolist()):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            new_tokens += sum(1 for t in seq if t != tokenizer.pad_token_id)
            rows.append(
                {
                    "id": chat["id"],
                    "prompt": chat["prompt"],
                    "response": text,
                    "max_new_tokens": cfg.max_new_tokens,
                    "do_sample": False,
                }
            )
    write_text_atomic(
        ctx.run_dir / "generations" / "probe.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    )
    nll = nll_sum / max(n_tokens, 1)
    throughput = {}
    if rows:
        throughput = {
            "throughput/probe/gen_tokens_per_s": round(new_tokens / max(gen_seconds, 1e-9), 2),
            "throughput/probe/gen_tokens": new_tokens,
            "throughput/probe/gen_seconds": round(gen_seconds, 3),
        }
    return {
        "probe/nll": round(nll, 5),
        "probe/ppl": round(float(torch.tensor(nll).exp()), 4),
        "probe/target_tokens": n_tokens,
        "probe/generated_tokens": new_tokens,
        "probe/generate_tokens_per_s": round(new_tokens / max(gen_seconds, 1e-9), 2),
        "probe/model_load_s": round(loaded.load_seconds, 3),
        **throughput,
    }
