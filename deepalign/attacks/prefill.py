"""The `prefill` attack type: the assistant turn starts with the first k tokens of a harmful response (a
depth), or with a fixed string. Its variants are `<name>/k=N` per depth and `<name>/str=I` per string; its
ASR-vs-depth curve is summarised as the `depth/...` metrics (deepalign/depth.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deepalign.attacks.base import Attack, AttackRun
from deepalign.config import check
from deepalign.data import DataError
from deepalign.depth import depth_metrics
from deepalign.eval_items import EvalItem, Variant, check_prefill_depths
from deepalign.generation import SamplingParams
from deepalign.plugins import register_attack


@dataclass
class PrefillAttackConfig:
    # prefill depths in tokens, each once; depth 0 (the plain request on this instance's own items) always
    # runs, listed or not: the ASR-vs-depth curve (depth/asr_auc, depth/k50) starts from it
    depths: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 40])
    strings: list[str] = field(default_factory=list)  # fixed-string prefills, e.g. a refusal prefix
    # the eval set's field the depths are cut from; null: the harmful response (`eval.columns.harmful`).
    # Items without the field are left out of this instance (e.g. another model's answers to some prompts).
    source: str | None = None

    def check(self, key: str) -> None:
        check(
            bool(self.depths or self.strings),
            f"{key}.depths",
            f"empty, and no {key}.strings: the prefill attack would run nothing (e.g. depths=[5,10])",
        )
        for i, k in enumerate(self.depths):
            check(k >= 0, f"{key}.depths[{i}]", f"a prefill depth is a token count >= 0, got {k}")
            check(
                k not in self.depths[:i],
                f"{key}.depths[{i}]",
                f"depth {k} is listed twice: every answer at it would be counted twice; list each depth once",
            )


@register_attack("prefill", config=PrefillAttackConfig)
class PrefillAttack(Attack):
    """The assistant turn starts with the first k tokens of a harmful response, or with a fixed string."""

    prefills_responses = True

    def check(self, items: list[EvalItem], tokenizer: Callable[[], Any], *, system: str | None) -> None:
        source = self.cfg.source
        if source is not None and not any(i.response(source) for i in items):
            raise DataError(
                f"attack.{self.name}.source: no evaluation item has a field {source!r} "
                f"(fields of the first: {', '.join(items[0].columns) if items else 'no items'})"
            )
        if any(self.cfg.depths):  # needs the tokenizer only, not the model
            check_prefill_depths(
                items, self.cfg.depths, tokenizer(), system=system, source=source, key=f"attack.{self.name}"
            )

    def variants(self, run: AttackRun, base: SamplingParams) -> list[Variant]:
        """`<name>/k=N` per depth, with k=0 (the plain request on this instance's items) first where it is
        not listed, then `<name>/str=I` per fixed string."""
        source, depths = self.cfg.source, list(self.cfg.depths)
        depths = depths if not depths or 0 in depths else [0, *depths]
        out = [Variant(f"{self.name}/k={k}", base, depth=k, source=source) for k in depths]
        return out + [
            Variant(f"{self.name}/str={i}", base, prefill=s) for i, s in enumerate(self.cfg.strings)
        ]

    def summary_metrics(
        self, metrics: Mapping[str, float], judges: Sequence[str], primary: str | None
    ) -> dict[str, float]:
        """With depths, this instance's ASR-vs-depth curve summarised (`depth_metrics`): `depth/...` by the
        primary judge for the instance named `prefill`, `depth/<name>/...` for another, `depth_<judge>/...`
        by each judge."""
        if not self.cfg.depths:
            return {}
        return depth_metrics(metrics, [self.name], judges, primary)
