"""Whether the evaluation items fit the model's context, as the attack stage asks them: checked before any
model loads (the attack stage's preflight), from the model's config alone."""

from __future__ import annotations

import logging
from typing import Any

from deepalign.config import DeepAlignConfig, ModelConfig
from deepalign.data import DataError

log = logging.getLogger(__name__)


# the keys of a transformers model config that give its context, in positions
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context(cfg: ModelConfig) -> tuple[int, str] | None:
    """The model's context in positions and the config key that gives it, read from its config (config.json,
    or `model.arch` for a random model) without loading weights; None where its config names none or cannot
    be read here (loading the model then says why)."""
    from transformers import AutoConfig

    try:
        if cfg.source == "random":
            arch = dict(cfg.arch)
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        elif cfg.source == "hf":
            config = AutoConfig.from_pretrained(
                cfg.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
            )
        else:  # gguf: converted once, by the tokenizer's loading already
            from deepalign.models import convert_gguf

            config = AutoConfig.from_pretrained(convert_gguf(cfg.gguf_package, cfg.gguf_file, cfg.cache_dir))
    except (OSError, ValueError, KeyError) as err:
        log.debug("model %s: its context is not known before loading it (%s)", cfg.name, err)
        return None
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def check_context(config: DeepAlignConfig, items: list[Any], attacks: list[Any], tokenizer: Any) -> None:
    """Every evaluation item fits the model's context as the attack stage asks it: the prompt in the chat
    template (rendered by the same code as the requests, `variant_prefill`), with the deepest prefill
    of each prefill attack, each fixed prefill, a GCG suffix, plus `generation.max_new_tokens`. Past its
    context a model still answers (positions it never saw), slowly and in garbage that the judges count:
    a DataError naming the first such item and both lengths."""
    found = model_context(config.model)
    if found is None:
        return
    context, key = found
    from deepalign.attacks.gcg import GCGAttack
    from deepalign.attacks.prefill import PrefillAttack
    from deepalign.eval_items import Variant, variant_prefill
    from deepalign.generation import default_params

    base, new = default_params(config.generation), config.generation.max_new_tokens
    # the longest request of each attack: (what it adds to the prompt, its variant, tokens appended)
    longest: list[tuple[str, Variant, int]] = [("", Variant("plain", base), 0)]
    for attack in attacks:
        name, cfg = attack.name, attack.cfg
        if isinstance(attack, PrefillAttack):
            if any(cfg.depths):
                deepest = max(cfg.depths)
                variant = Variant(name, base, depth=deepest, source=cfg.source)
                longest.append((f", the attack.{name} prefill of depth {deepest}", variant, 0))
            for i, text in enumerate(cfg.strings):
                longest.append(
                    (f", the prefill attack.{name}.strings[{i}]", Variant(name, base, prefill=text), 0)
                )
        elif isinstance(attack, GCGAttack):
            what = f", the attack.{name} suffix (suffix_length {cfg.suffix_length})"
            longest.append((what, Variant(name, base), cfg.suffix_length))
    too_long = []
    for item in items:
        for what, variant, extra in longest:
            if variant.source is not None and item.response(variant.source) is None:
                continue  # not asked with this prefill
            ids, _ = variant_prefill(variant, item, item.prompt, tokenizer, system=config.data.system_prompt)
            if len(ids) + extra + new > context:
                too_long.append((item.id, len(ids) + extra, what))
                break
    if too_long:
        item_id, n, what = too_long[0]
        more = f" ({len(too_long) - 1} more items are too long as well)" if len(too_long) > 1 else ""
        raise DataError(
            f"eval.prompts: item {item_id} does not fit the model's context: {n} tokens (prompt, chat "
            f"template{what}) + {new} new tokens (generation.max_new_tokens) = {n + new}, more than the "
            f"{context} positions of model {config.model.name} ({key}){more}; shorten or drop the item, or "
            "lower generation.max_new_tokens"
        )
