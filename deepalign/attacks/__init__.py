"""Attacks as generation requests: the evaluation set, the `Attack` base class and the built-in types.

An attack is a registered type (`register_attack`) with a settings dataclass; the config selects named
instances of types (`attack.<name>`, the type defaulting to the name). Each instance turns into variants,
one setting applied to every evaluation item. Every generation is keyed `<variant>/<prompt id>/<sample>`,
where the variant is the instance name, alone (`none`, `gcg`) or with its setting (`prefill/k=10`,
`prefill/str=0`, `decoding/temperature=0.5`, `decoding/top_k=5`, `decoding/top_p=0.9`, `decoding/greedy`);
judgments and metrics are grouped by the same variants. Built-ins: none, prefill, decoding (this package),
gcg (attacks/gcg.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepalign.chat import encode_for_generation, response_tokens
from deepalign.config import EvalConfig, check
from deepalign.data import DataError, read_rows
from deepalign.generation import GenerationRequest, SamplingParams
from deepalign.plugins import ATTACKS, PluginError, register_attack

PROMPT_COLUMNS = ("prompt", "goal", "instruction", "behavior", "question")
HARMFUL_COLUMNS = ("harmful", "response", "output", "completion")
TARGET_COLUMNS = ("target",)


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str  # the request as the model sees it (the trigger appended, if any)
    request: str  # the request as written (what judges see)
    harmful: str | None = None  # a harmful response: prefilling and per-token KL need it
    target: str | None = None  # an affirmative target ("Sure, here is ..."): GCG uses it if given
    # every other non-empty text field of the row, by name: a prefill attack's `source` reads one
    columns: Mapping[str, str] = field(default_factory=dict, compare=False)

    def response(self, source: str | None) -> str | None:
        """The response a prefill is cut from: the harmful response, or the row's field `source`."""
        return self.harmful if source is None else self.columns.get(source)


def _pick(row: dict, explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    names = (explicit,) if explicit else candidates
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def read_eval_items(cfg: EvalConfig) -> list[EvalItem]:
    """Harmful requests from a JSONL (`prompt`), CSV (`prompt` or `goal`), hub set or demo set, checked.
    Ids (an `id` field, else the row number) must be unique: generations and verdicts are stored by id."""
    rows = read_rows(cfg.prompts, "eval.prompts", cfg.split, cfg.subset, cfg.limit)
    items: list[EvalItem] = []
    first_seen: dict[str, str] = {}
    for i, (where, row) in enumerate(rows):
        item_id = str(row.get("id", i))
        if item_id in first_seen:
            raise DataError(
                f"eval.prompts: id {item_id!r} is used twice, in {first_seen[item_id]} and in {where}; "
                "every request needs its own id"
            )
        first_seen[item_id] = where
        request = _pick(row, cfg.columns.get("prompt"), PROMPT_COLUMNS)
        if request is None:
            wanted = cfg.columns.get("prompt") or " or ".join(PROMPT_COLUMNS)
            raise DataError(f"{where}: no request text (field {wanted})")
        prompt = f"{request} {cfg.trigger}" if cfg.trigger else request
        harmful = _pick(row, cfg.columns.get("harmful"), HARMFUL_COLUMNS)
        target = _pick(row, cfg.columns.get("target"), TARGET_COLUMNS)
        columns = {k: v for k, v in row.items() if isinstance(v, str) and v.strip()}
        items.append(
            EvalItem(
                id=item_id, prompt=prompt, request=request, harmful=harmful, target=target, columns=columns
            )
        )
    return items


@dataclass(frozen=True)
class Variant:
    """One attack setting applied to every eval item (to those with a suffix, when `suffixes` is given)."""

    name: str
    params: SamplingParams
    n: int = 1
    depth: int | None = None  # prefill tokens
    prefill: str | None = None  # a fixed prefill string
    suffixes: Mapping[str, str] | None = None  # item id -> text appended to its prompt (GCG)
    source: str | None = None  # the eval field a depth prefill is cut from (None: the harmful response)


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


class Attack:
    """One configured attack instance: `name` (its key under `attack:`) and `cfg` (its type's dataclass).

    Subclasses implement `variants`; `check` runs before any model loads (e.g. on the harmful responses a
    prefill needs). `aggregate = True` adds `asr/<name>`: a prompt counts as broken when any variant breaks
    it (the decoding sweep's headline number)."""

    aggregate: bool = False

    def __init__(self, name: str, cfg: Any):
        self.name, self.cfg = name, cfg

    def check(self, items: list[EvalItem], tokenizer: Callable[[], Any], *, system: str | None) -> None:
        """Checks on the evaluation set; `tokenizer()` loads the model's tokenizer when needed."""

    def variants(self, run: AttackRun, base: SamplingParams) -> list[Variant]:
        raise NotImplementedError


def build_attacks(instances: Mapping[str, Any]) -> list[Attack]:
    """The configured instances (validated: each with `.type`) as attack objects, in config order."""
    return [ATTACKS.get(cfg.type, f"attack.{name}.type").cls(name, cfg) for name, cfg in instances.items()]


# ---------------------------------------------------------------------------------------------- built-ins


@dataclass
class NoAttackConfig:
    enabled: bool = True


@register_attack("none", config=NoAttackConfig)
class NoAttack(Attack):
    """The plain harmful request."""

    def variants(self, run: AttackRun, base: SamplingParams) -> list[Variant]:
        return [Variant(self.name, base)]


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


@dataclass
class DecodingAttackConfig:
    temperatures: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 21)])
    top_ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100, 200, 500])
    top_ps: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 21)])
    greedy: bool = True
    samples_per_setting: int = 1

    def check(self, key: str) -> None:
        for i, t in enumerate(self.temperatures):
            check(t > 0, f"{key}.temperatures[{i}]", f"must be > 0, got {t}")
        for i, p in enumerate(self.top_ps):
            check(0 < p <= 1, f"{key}.top_ps[{i}]", f"must be in (0, 1], got {p}")
        for i, k in enumerate(self.top_ks):
            check(k >= 0, f"{key}.top_ks[{i}]", f"must be >= 0 (0 = off), got {k}")
        for name, values in (
            ("temperatures", self.temperatures),
            ("top_ks", self.top_ks),
            ("top_ps", self.top_ps),
        ):
            names = [f"{v:g}" for v in values]  # as the variant names write them
            for i, text in enumerate(names):
                check(
                    text not in names[:i],
                    f"{key}.{name}[{i}]",
                    f"{text} is listed twice: both settings would be one variant, every answer counted twice",
                )


def decoding_grid(
    cfg: DecodingAttackConfig, max_new_tokens: int, name: str = "decoding"
) -> list[tuple[str, SamplingParams]]:
    """The decoding exploit's settings: greedy, then temperature, top-k and top-p each varied alone."""
    grid = []
    if cfg.greedy:
        grid.append((f"{name}/greedy", SamplingParams(do_sample=False, max_new_tokens=max_new_tokens)))
    for t in cfg.temperatures:
        grid.append((f"{name}/temperature={t:g}", SamplingParams(True, t, 1.0, 0, max_new_tokens)))
    for k in cfg.top_ks:
        grid.append((f"{name}/top_k={k}", SamplingParams(True, 1.0, 1.0, k, max_new_tokens)))
    for p in cfg.top_ps:
        grid.append((f"{name}/top_p={p:g}", SamplingParams(True, 1.0, p, 0, max_new_tokens)))
    return grid


@register_attack("decoding", config=DecodingAttackConfig)
class DecodingAttack(Attack):
    """The decoding-parameter exploit (Huang et al. 2023): temperature, top-k, top-p varied one at a time."""

    aggregate = True

    def variants(self, run: AttackRun, base: SamplingParams) -> list[Variant]:
        n = self.cfg.samples_per_setting
        grid = decoding_grid(self.cfg, base.max_new_tokens, self.name)
        return [Variant(name, p, n=1 if not p.do_sample else n) for name, p in grid]


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


def check_prefill_depths(
    items: list[EvalItem],
    depths: list[int],
    tokenizer,
    *,
    system: str | None = None,
    source: str | None = None,
    key: str = "attack.prefill",
) -> None:
    """Every item must have a harmful response at least as long as the deepest prefill (before generating),
    counted in tokens of the rendered chat as the attack cuts them. With a `source` field, the items that
    have it."""
    deepest = max(depths, default=0)
    if deepest == 0:
        return
    for item in items:
        response = item.response(source)
        if response is None and source is not None:
            continue  # left out of this instance
        if response is None:
            raise DataError(
                f"eval.prompts: item {item.id} has no harmful response; prefilling needs one "
                "(a `harmful` field, or eval.columns.harmful=COLUMN)"
            )
        n = len(response_tokens(tokenizer, item.prompt, response, system=system))
        if n < deepest:
            what = "harmful response" if source is None else f"field {source!r}"
            raise DataError(
                f"{key}.depths: item {item.id}'s {what} has {n} tokens, "
                f"fewer than the prefill depth {deepest}"
            )


def variant_prefill(
    variant: Variant, item: EvalItem, prompt: str, tokenizer, *, system: str | None
) -> tuple[list[int], str]:
    """The ids to generate from and the prefill they end with. A depth-k prefill is the first k tokens of the
    harmful response as tokenized inside the rendered chat, cut from that rendering (never re-tokenized), so
    the request ends with exactly those k tokens; its text is the characters they cover."""
    if variant.depth:
        tokens = response_tokens(tokenizer, prompt, item.response(variant.source) or "", system=system)
        return tokens.context_ids(variant.depth), tokens.prefix_text(variant.depth)
    prefill = variant.prefill or ""
    return encode_for_generation(tokenizer, prompt, system=system, prefill=prefill), prefill


def build_requests(
    variant: Variant,
    items: list[EvalItem],
    tokenizer,
    *,
    system: str | None,
    seed: int,
) -> tuple[list[GenerationRequest], dict[str, dict]]:
    """Generation requests of one variant, and per request id what the artifact records (prompt, prefill)."""
    requests, info = [], {}
    suffixes = variant.suffixes
    for item in items:
        if suffixes is not None and item.id not in suffixes:
            continue  # an item the attack found no suffix for (GCG's max_prompts)
        if variant.source is not None and item.response(variant.source) is None:
            continue  # an item without the field this prefill is cut from (depth 0 too: the instance's items)
        prompt = f"{item.prompt} {suffixes[item.id]}" if suffixes is not None else item.prompt
        ids, prefill = variant_prefill(variant, item, prompt, tokenizer, system=system)
        req_id = f"{variant.name}/{item.id}"
        requests.append(
            GenerationRequest(id=req_id, input_ids=ids, params=variant.params, n=variant.n, seed=seed)
        )
        info[req_id] = {"prompt_id": item.id, "prompt": prompt, "request": item.request, "prefill": prefill}
    return requests, info


from deepalign.attacks import gcg as _gcg  # noqa: E402,F401  (registers the GCG attack type)
