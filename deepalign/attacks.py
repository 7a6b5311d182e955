"""The attack suite as generation requests: plain requests, prefilling, the decoding grid, GCG suffixes.

Every generation is keyed `<variant>/<prompt id>/<sample>`, where the variant is `none`, `prefill/k=10`,
`prefill/str=0`, `decoding/temperature=0.5`, `decoding/top_k=5`, `decoding/top_p=0.9`, `decoding/greedy`
or `gcg`; judgments and metrics are grouped by the same variants.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepalign.chat import encode_for_generation, response_tokens
from deepalign.config import AttackSuite, DecodingAttack, EvalConfig
from deepalign.data import DataError, read_rows
from deepalign.generation import GenerationRequest, SamplingParams

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
        items.append(EvalItem(id=item_id, prompt=prompt, request=request, harmful=harmful, target=target))
    return items


def decoding_grid(cfg: DecodingAttack, max_new_tokens: int) -> list[tuple[str, SamplingParams]]:
    """The decoding exploit's settings: greedy, then temperature, top-k and top-p each varied alone."""
    grid = []
    if cfg.greedy:
        grid.append(("decoding/greedy", SamplingParams(do_sample=False, max_new_tokens=max_new_tokens)))
    for t in cfg.temperatures:
        grid.append((f"decoding/temperature={t:g}", SamplingParams(True, t, 1.0, 0, max_new_tokens)))
    for k in cfg.top_ks:
        grid.append((f"decoding/top_k={k}", SamplingParams(True, 1.0, 1.0, k, max_new_tokens)))
    for p in cfg.top_ps:
        grid.append((f"decoding/top_p={p:g}", SamplingParams(True, 1.0, p, 0, max_new_tokens)))
    return grid


@dataclass(frozen=True)
class Variant:
    """One attack setting applied to every eval item."""

    name: str
    params: SamplingParams
    n: int = 1
    depth: int | None = None  # prefill tokens
    prefill: str | None = None  # a fixed prefill string


def attack_variants(suite: AttackSuite, base: SamplingParams) -> dict[str, list[Variant]]:
    """The enabled attacks (except GCG, whose suffixes are searched first) as variants, by attack name."""
    out: dict[str, list[Variant]] = {}
    if suite.none is not None:
        out["none"] = [Variant("none", base)]
    if suite.prefill is not None:
        variants = [Variant(f"prefill/k={k}", base, depth=k) for k in suite.prefill.depths]
        variants += [
            Variant(f"prefill/str={i}", base, prefill=s) for i, s in enumerate(suite.prefill.strings)
        ]
        out["prefill"] = variants
    if suite.decoding is not None:
        n = suite.decoding.samples_per_setting
        out["decoding"] = [
            Variant(name, p, n=1 if not p.do_sample else n)
            for name, p in decoding_grid(suite.decoding, base.max_new_tokens)
        ]
    return out


def check_prefill_depths(
    items: list[EvalItem], depths: list[int], tokenizer, *, system: str | None = None
) -> None:
    """Every item must have a harmful response at least as long as the deepest prefill (before generating),
    counted in tokens of the rendered chat as the attack cuts them."""
    deepest = max(depths, default=0)
    if deepest == 0:
        return
    for item in items:
        if item.harmful is None:
            raise DataError(
                f"eval.prompts: item {item.id} has no harmful response; prefilling needs one "
                "(a `harmful` field, or eval.columns.harmful=COLUMN)"
            )
        n = len(response_tokens(tokenizer, item.prompt, item.harmful, system=system))
        if n < deepest:
            raise DataError(
                f"attack.prefill.depths: item {item.id}'s harmful response has {n} tokens, "
                f"fewer than the prefill depth {deepest}"
            )


def variant_prefill(
    variant: Variant, item: EvalItem, prompt: str, tokenizer, *, system: str | None
) -> tuple[list[int], str]:
    """The ids to generate from and the prefill they end with. A depth-k prefill is the first k tokens of the
    harmful response as tokenized inside the rendered chat, cut from that rendering (never re-tokenized), so
    the request ends with exactly those k tokens; its text is the characters they cover."""
    if variant.depth:
        tokens = response_tokens(tokenizer, prompt, item.harmful or "", system=system)
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
    suffixes: dict[str, str] | None = None,
) -> tuple[list[GenerationRequest], dict[str, dict]]:
    """Generation requests of one variant, and per request id what the artifact records (prompt, prefill)."""
    requests, info = [], {}
    for item in items:
        prompt = f"{item.prompt} {suffixes[item.id]}" if suffixes is not None else item.prompt
        ids, prefill = variant_prefill(variant, item, prompt, tokenizer, system=system)
        req_id = f"{variant.name}/{item.id}"
        requests.append(
            GenerationRequest(id=req_id, input_ids=ids, params=variant.params, n=variant.n, seed=seed)
        )
        info[req_id] = {"prompt_id": item.id, "prompt": prompt, "request": item.request, "prefill": prefill}
    return requests, info
