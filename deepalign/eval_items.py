"""The evaluation set and the generation requests made from it, shared by every stage that generates.

`read_eval_items` reads the harmful requests (`eval.prompts`); a `Variant` is one setting applied to every
item (sampling parameters, a prefill, suffixes, rewritten prompts); `build_requests` turns a variant into
the engine's requests, rendering each item's chat exactly as the model is asked. Attacks
(deepalign/attacks/) build variants; the attack, utility and quickstart stages and the generation store
use these types without depending on any attack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from deepalign.chat import encode_for_generation, response_tokens
from deepalign.config import EvalConfig
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
    """One attack setting applied to every eval item (to those with a suffix, when `suffixes` is given, and
    to those with a prompt, when `prompts` is given)."""

    name: str
    params: SamplingParams
    n: int = 1
    depth: int | None = None  # prefill tokens
    prefill: str | None = None  # a fixed prefill string
    suffixes: Mapping[str, str] | None = None  # item id -> text appended to its prompt (GCG)
    source: str | None = None  # the eval field a depth prefill is cut from (None: the harmful response)
    # item id -> the prompt the model is asked in place of the item's (a prompt transform, e.g. a template);
    # judges still see the item's request
    prompts: Mapping[str, str] | None = None


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
    suffixes, prompts = variant.suffixes, variant.prompts
    for item in items:
        if suffixes is not None and item.id not in suffixes:
            continue  # an item the attack found no suffix for (GCG's max_prompts)
        if prompts is not None and item.id not in prompts:
            continue  # an item the attack wrote no prompt for
        if variant.source is not None and item.response(variant.source) is None:
            continue  # an item without the field this prefill is cut from (depth 0 too: the instance's items)
        prompt = prompts[item.id] if prompts is not None else item.prompt
        prompt = f"{prompt} {suffixes[item.id]}" if suffixes is not None else prompt
        ids, prefill = variant_prefill(variant, item, prompt, tokenizer, system=system)
        req_id = f"{variant.name}/{item.id}"
        requests.append(
            GenerationRequest(id=req_id, input_ids=ids, params=variant.params, n=variant.n, seed=seed)
        )
        info[req_id] = {"prompt_id": item.id, "prompt": prompt, "request": item.request, "prefill": prefill}
    return requests, info
