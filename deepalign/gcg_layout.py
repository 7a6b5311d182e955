"""Where a GCG suffix sits in the rendered chat and which tokens it may take (the search: deepalign/gcg.py).

Layout. The conversation is rendered through the tokenizer's own chat template (`deepalign.chat`), with the
user content `prompt + marker`; the rendering is split at the marker into the text before the suffix (ending
with the request) and after it (end of the user turn and the generation prompt). The assembled rendering
`before + " " + suffix + after` is tokenized in one piece (as generation does) and split by character
offsets into `before_ids | suffix_ids | after_ids`; the target is tokenized alone and appended. The space that
joins request and suffix belongs to the suffix's tokens (" !" is one token in BPE vocabularies), so the
suffix's first token always starts with a space and the tokens before the suffix never change.

Token constraints. Candidate tokens come from an allowed set built once per tokenizer: printable ASCII text
that is not only whitespace, no special or added-special tokens, nothing beyond the tokenizer's vocabulary
(padded embedding rows). The first position only takes tokens starting with a space, the last none ending in
whitespace (templates that strip the content would drop it). Retokenisation filter: a candidate is kept only
if the whole rendering with its decoded text tokenizes back to exactly `before_ids + candidate + after_ids`
for every prompt (the standard decode -> re-encode check, done in context, so the suffix the attack stage
renders is the one that was optimised).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deepalign.chat import chat_messages, encode_for_generation, special_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SEPARATOR = " "  # joins the request and the suffix: the user content is f"{prompt} {suffix}"
INIT_TOKEN_TEXT = "!"  # the paper's initial suffix "! ! ! ... !"
_MARKER = "[[deepalign-gcg-suffix]]"


# ----------------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class TokenTable:
    """Per embedding row: may GCG place it in a suffix, and does its text start / end with whitespace."""

    allowed: torch.Tensor  # [V] bool
    leading_space: torch.Tensor  # [V] bool: the token's text starts with SEPARATOR
    trailing_space: torch.Tensor  # [V] bool
    anchor: int  # a plain token decoded in front of a suffix, so tokenizers that drop a leading space
    anchor_text: str  # at the start of a decode (SentencePiece) keep it

    def position_masks(self, length: int) -> torch.Tensor:
        """[length, V] allowed tokens per suffix position (first: starts with a space; last: no trailing
        whitespace)."""
        masks = self.allowed.unsqueeze(0).repeat(length, 1)
        masks[0] &= self.leading_space
        masks[-1] &= ~self.trailing_space
        return masks

    def decode(self, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sequence[int]]) -> list[str | None]:
        """Each row's text as it reads inside a longer text (None if the decode is not a plain extension)."""
        texts = tokenizer.batch_decode(
            [[self.anchor, *row] for row in rows],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        n = len(self.anchor_text)
        return [t[n:] if t.startswith(self.anchor_text) else None for t in texts]


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_table(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> TokenTable:
    """The allowed-token mask for an embedding matrix of `vocab_size` rows (built once per tokenizer)."""
    per_tokenizer = _TABLES.setdefault(tokenizer, {})
    if vocab_size in per_tokenizer:
        return per_tokenizer[vocab_size]
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    anchor_text = tokenizer.decode([anchor], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    n = min(vocab_size, len(tokenizer))
    special = special_ids(tokenizer)
    table = TokenTable(
        torch.zeros(vocab_size, dtype=torch.bool),
        torch.zeros(vocab_size, dtype=torch.bool),
        torch.zeros(vocab_size, dtype=torch.bool),
        anchor,
        anchor_text,
    )
    texts = table.decode(tokenizer, [[i] for i in range(n)])
    for i, text in enumerate(texts):
        if text is None or i in special or not text.strip() or not (text.isascii() and text.isprintable()):
            continue
        table.allowed[i] = True
        table.leading_space[i] = text.startswith(SEPARATOR)
        table.trailing_space[i] = text[-1].isspace()
    per_tokenizer[vocab_size] = table
    return table


# ----------------------------------------------------------------------------------------------------------
# Layout


@dataclass
class PromptLayout:
    """One prompt's rendering split around the suffix: `before_ids + suffix_ids + after_ids` is the
    tokenization of `before_text + " " + suffix + after_text`; the target ids follow `after_ids`."""

    prompt: str
    target: str
    before_text: str  # the rendering up to and including the request
    after_text: str  # the rest of the user turn and the generation prompt
    before_ids: list[int]
    suffix_ids: list[int]  # the initial suffix
    after_ids: list[int]
    target_ids: list[int]

    def full_text(self, suffix_text: str) -> str:
        """The rendering with a suffix's text (which starts with the separator)."""
        return self.before_text + suffix_text + self.after_text

    def input_ids(self, suffix_ids: Sequence[int]) -> list[int]:
        return [*self.before_ids, *suffix_ids, *self.after_ids, *self.target_ids]


def build_layout(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str,
    *,
    suffix_length: int,
    system: str | None = None,
) -> PromptLayout:
    """Split the chat-template rendering of `prompt + " " + "! ! ... !"` into before / suffix / after ids."""
    if not target:
        raise ValueError("GCG target is empty")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; GCG needs character offsets")
    if _MARKER in prompt or (system and _MARKER in system):
        raise ValueError(f"the prompt contains the GCG marker {_MARKER!r}")
    rendered = tokenizer.apply_chat_template(
        chat_messages(prompt + _MARKER, system=system), tokenize=False, add_generation_prompt=True
    )
    if rendered.count(_MARKER) != 1:
        raise ValueError(
            "the chat template does not render the user content verbatim; GCG cannot place a suffix"
        )
    at = rendered.index(_MARKER)
    before_text, after_text = rendered[:at], rendered[at + len(_MARKER) :]
    init_text = SEPARATOR + SEPARATOR.join([INIT_TOKEN_TEXT] * suffix_length)
    full = before_text + init_text + after_text
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    start, end = len(before_text), len(before_text) + len(init_text)
    parts: dict[str, list[int]] = {"before": [], "suffix": [], "after": []}
    for i, (s, e) in enumerate(offsets):
        part = "before" if s < start else "suffix" if s < end else "after"
        limit = start if part == "before" else end if part == "suffix" else len(full)
        if e > limit:
            raise ValueError(
                f"token {tokenizer.convert_ids_to_tokens(ids[i])!r} of the rendering straddles the "
                "boundary of the GCG suffix; the tokenizer merges the suffix with its context"
            )
        parts[part].append(ids[i])
    if len(parts["suffix"]) != suffix_length:
        raise ValueError(
            f"the initial suffix {init_text!r} is {len(parts['suffix'])} tokens, not "
            f"suffix_length={suffix_length}, with this tokenizer"
        )
    if encode_for_generation(tokenizer, f"{prompt}{init_text}", system=system) != ids:
        raise ValueError("rendering the prompt with a suffix does not give the split rendering's tokens")
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    return PromptLayout(
        prompt, target, before_text, after_text, parts["before"], parts["suffix"], parts["after"], target_ids
    )


def round_trips(
    tokenizer: PreTrainedTokenizerBase,
    table: TokenTable,
    layouts: Sequence[PromptLayout],
    candidates: torch.Tensor,
) -> tuple[torch.Tensor, list[str | None]]:
    """The retokenisation filter: [B] bool, True where the candidate's decoded text, rendered in every
    prompt, tokenizes back to exactly `before_ids + candidate + after_ids`; and each candidate's text."""
    rows = candidates.tolist()
    texts = table.decode(tokenizer, rows)
    keep = [t is not None and t.startswith(SEPARATOR) and t == t.rstrip() for t in texts]
    for layout in layouts:
        todo = [i for i, ok in enumerate(keep) if ok]
        if not todo:
            break
        encoded = tokenizer([layout.full_text(texts[i]) for i in todo], add_special_tokens=False)["input_ids"]
        for i, got in zip(todo, encoded):
            keep[i] = got == [*layout.before_ids, *rows[i], *layout.after_ids]
    return torch.tensor(keep, dtype=torch.bool), texts
