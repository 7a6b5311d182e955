"""The `Attack` base class: what a configured attack instance gives the attack stage.

An attack is a registered type (`register_attack`) with a settings dataclass; the config selects named
instances of types (`attack.<name>`, the type defaulting to the name). Each instance turns into variants
(deepalign/eval_items.py), one setting applied to every evaluation item, and may add metrics of its own
(`summary_metrics`) once every attack is judged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepalign.eval_items import EvalItem, Variant
from deepalign.generation import SamplingParams
from deepalign.plugins import ATTACKS, PluginError


@dataclass
class AttackRun:
    """What an attack may use to build its variants: the evaluation items, the model, where to store."""

    items: list[EvalItem]
    model: Any  # the loaded transformers model
    tokenizer: Any
    system: str | None
    seed: int
    run_dir: Path
    model_id: Callable[[], str]  # names the weights (RunContext.model_id): keys stored searches
    autocast: Any = None  # the torch dtype the engine generates under (None: the model's own): searches too


class Attack:
    """One configured attack instance: `name` (its key under `attack:`) and `cfg` (its type's dataclass).

    Subclasses implement `variants`; `check` runs before any model loads (e.g. on the harmful responses a
    prefill needs). `aggregate = True` adds `asr/<name>`: a prompt counts as broken when any variant breaks
    it (the decoding sweep's headline number). `prefills_responses = True` says that `cfg.depths` and
    `cfg.source` cut prefills from the items' responses (the quickstart sizes the answers it harvests by
    them)."""

    aggregate: bool = False
    prefills_responses: bool = False

    def __init__(self, name: str, cfg: Any):
        self.name, self.cfg = name, cfg

    def check(self, items: list[EvalItem], tokenizer: Callable[[], Any], *, system: str | None) -> None:
        """Checks on the evaluation set; `tokenizer()` loads the model's tokenizer when needed."""

    def variants(self, run: AttackRun, base: SamplingParams) -> list[Variant]:
        raise NotImplementedError

    def summary_metrics(
        self, metrics: Mapping[str, float], judges: Sequence[str], primary: str | None
    ) -> dict[str, float]:
        """Metrics this attack adds to the attack stage's, computed from them once every attack is judged:
        `asr/<variant>` by the primary judge (`primary`, None when there is none) and `asr_<judge>/<variant>`
        by each of `judges`. None by default."""
        return {}


def build_attacks(instances: Mapping[str, Any]) -> list[Attack]:
    """The configured instances (validated: each with `.type`) as attack objects, in config order."""
    return [ATTACKS.get(cfg.type, f"attack.{name}.type").cls(name, cfg) for name, cfg in instances.items()]


def unique_variants(attack: Attack, variants: list[Variant], seen: dict[str, str]) -> list[Variant]:
    """`variants` of `attack`, checked: no variant name twice, in this attack or in an earlier one (`seen`:
    variant name -> attack instance, updated). Generations, judgments and `asr/<variant>` are keyed by the
    name: a name given twice would count its answers twice (a PluginError naming the instance and name)."""
    for variant in variants:
        if variant.name in seen:
            where = (
                "twice" if seen[variant.name] == attack.name else f"also named by attack.{seen[variant.name]}"
            )
            raise PluginError(
                f"attack.{attack.name}: the variant {variant.name!r} is {where}; generations, judgments "
                "and asr/<variant> are keyed by the name (its answers would be counted twice): each variant "
                "needs its own name"
            )
        seen[variant.name] = attack.name
    return variants
