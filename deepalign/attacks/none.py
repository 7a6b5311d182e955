"""The `none` attack type: the plain harmful request, as written."""

from __future__ import annotations

from dataclasses import dataclass

from deepalign.attacks.base import Attack, AttackRun
from deepalign.eval_items import Variant
from deepalign.generation import SamplingParams
from deepalign.plugins import register_attack


@dataclass
class NoAttackConfig:
    enabled: bool = True


@register_attack("none", config=NoAttackConfig)
class NoAttack(Attack):
    """The plain harmful request."""

    def variants(self, run: AttackRun, base: SamplingParams) -> list[Variant]:
        return [Variant(self.name, base)]
