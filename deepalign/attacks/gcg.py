"""The GCG attack type: adversarial suffixes searched first (deepalign/gcg.py), then one generation each.

The search runs in the precision the answers are generated in (under the engine's autocast, e.g. bf16 where
`generation.dtype=auto` chooses it). Suffixes are stored in `attacks/<name>.jsonl` as they are found; a
stored suffix is reused only if it was searched on these weights, prompt(s), target(s), GCG settings,
precision, system prompt and seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch

from deepalign import gcg as search
from deepalign.attacks.base import Attack, AttackRun
from deepalign.config import check
from deepalign.eval_items import EvalItem, Variant
from deepalign.generation import SamplingParams
from deepalign.plugins import register_attack
from deepalign.storage.jsonl import JsonlStore


@dataclass
class GCGAttackConfig:
    suffix_length: int = 20
    topk: int = 256
    search_width: int = 512
    steps: int = 500
    target_template: str = "Sure, here is"
    universal: bool = False
    early_stop: bool = True
    max_prompts: int | None = None

    def check(self, key: str) -> None:
        for name in ("suffix_length", "topk", "search_width", "steps"):
            check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")


@register_attack("gcg", config=GCGAttackConfig)
class GCGAttack(Attack):
    """GCG (Zou et al. 2023): a suffix per prompt (or one universal suffix) that makes the answer start with
    an affirmative target; the prompts are then answered with their suffix appended."""

    def suffixes(self, run: AttackRun) -> dict[str, str]:
        """Suffixes per item (or one universal suffix), resumed from `attacks/<name>.jsonl`."""
        cfg = self.cfg
        store = JsonlStore(run.run_dir / "attacks" / f"{self.name}.jsonl")
        chosen = run.items[: cfg.max_prompts] if cfg.max_prompts else run.items
        targets = {i.id: i.target or search.default_target(i.request, cfg.target_template) for i in chosen}
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "type"}
        setting = [run.model_id(), settings, run.seed, run.system]
        if run.autocast is not None:
            setting.append(str(run.autocast))

        def search_id(searched: list[EvalItem]) -> str:
            blob = json.dumps([setting, [[i.prompt, targets[i.id]] for i in searched]], sort_keys=True)
            return hashlib.sha256(blob.encode()).hexdigest()[:16]

        wanted = {"universal": search_id(chosen)} if cfg.universal else {i.id: search_id([i]) for i in chosen}
        stale = {k for k, v in wanted.items() if store.records.get(k, {}).get("search_id") != v}
        todo = chosen if cfg.universal and stale else [i for i in chosen if i.id in stale]
        if todo:
            device = next(run.model.parameters()).device.type
            with torch.autocast(device, dtype=run.autocast, enabled=run.autocast is not None):
                results = search.run_gcg(
                    run.model,
                    run.tokenizer,
                    [i.prompt for i in todo],
                    [targets[i.id] for i in todo],
                    cfg,
                    system=run.system,
                    seed=run.seed,
                    prompt_ids=[i.id for i in todo],
                )
            for r in results:
                store.append([{"key": r.prompt_id, **vars(r), "search_id": wanted[r.prompt_id]}])
        if cfg.universal:
            return {i.id: store.records["universal"]["suffix"] for i in chosen}
        return {i.id: store.records[i.id]["suffix"] for i in chosen}

    def variants(self, run: AttackRun, base: SamplingParams) -> list[Variant]:
        return [Variant(self.name, base, suffixes=self.suffixes(run))]
