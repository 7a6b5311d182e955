"""Chats through the tokenizer's own chat template: training ids with a label mask, and generation prompts.

Nothing here writes a template or a token id by hand. The text is rendered by `apply_chat_template`, tokenized
once (fast tokenizers, with character offsets), and each token's role is read from its character span: the
assistant's content is located in the rendering after the part that precedes it (the conversation up to the
generation prompt), so templates that strip or pad the content (Llama-2, Gemma) are handled too.

The label mask is one contiguous run: from the first token of the response (after any prefill) through the
template's end-of-turn token (the first special token after the response). Template text between the
response and that token (Llama-2's `' '` before `</s>`) is in the run: the model must emit it to end the turn.

"The first k tokens of a response" (prefilling attacks, recovery examples, the first-token margin) are
counted in the rendered chat (`response_tokens`), never on the response tokenized alone: the two differ
where a SentencePiece tokenizer or a stripping template treats the response's start differently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase


class NoLabelError(ValueError):
    """Truncation to `max_length` would leave no token to train on."""


@dataclass
class EncodedChat:
    input_ids: list[int]
    labels_mask: list[bool]  # True exactly on the tokens the loss is taken on
    prompt_length: int  # number of tokens before the assistant's content starts (context length)


def chat_messages(
    prompt: str, response: str | None = None, system: str | None = None
) -> list[dict[str, str]]:
    """The message list for one exchange; `system=None` keeps the template's default, `""` is an empty one."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _require_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template")


def _require_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    _require_template(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: the label mask needs character offsets "
            "(return_offsets_mapping); load it with use_fast=True"
        )


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the special tokens: the named ones and every added token marked special (e.g. a chat
    template's end-of-turn token that is not the tokenizer's eos)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return ids


def _content_span(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], full: str
) -> tuple[int, int, int]:
    """Where the last (assistant) message's content sits in the rendering `full`: (start, end, leading chars
    the template stripped from it)."""
    content = messages[-1]["content"]
    context = _render(tokenizer, messages[:-1], add_generation_prompt=True)
    if not full.startswith(context):
        # No generation prompt, or one the full rendering does not share: search after the common part.
        context = os.path.commonprefix([full, _render(tokenizer, messages[:-1])])
    search_from = len(context)
    for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
        start = full.find(candidate, search_from)
        if start >= 0:
            lead = (
                len(content) - len(content.lstrip())
                if candidate in (content.strip(), content.lstrip())
                else 0
            )
            return start, start + len(candidate), lead
    raise ValueError(
        f"the assistant content {content[:80]!r} does not appear in the chat template's rendering after "
        f"character {search_from}; the template changes the content in a way this module cannot follow"
    )


def _tokenized_turn(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[str, int, int, int, list[int], list[tuple[int, int]]]:
    """The rendered chat, where its last message's content sits in it (start, end, leading characters the
    template stripped), and its ids and character offsets (tokenized once)."""
    _require_fast(tokenizer)
    full = _render(tokenizer, messages)
    start, end, lead = _content_span(tokenizer, messages, full)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return full, start, end, lead, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_for_training(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    *,
    system: str | None = None,
    prefill: str = "",
    prefill_ids: Sequence[int] | None = None,
    max_length: int | None = None,
) -> EncodedChat:
    """Ids of the rendered chat with the assistant content `prefill + response`; the loss is on the response
    and the end-of-turn token only. `max_length` truncates from the right.

    `prefill_ids`, if given, are the exact ids of the chat through the prefill (a recovery example's k harmful
    tokens as the prefilling attack gives them, `ResponseTokens.context_ids(k)`): they replace the tokens the
    rendering has there, which can differ where the prefill ends (two newline tokens before `" I"` may merge
    into one). They must spell the same text, and the response's first token must start after the prefill."""
    messages = chat_messages(prompt, prefill + response, system)
    _, start, end, lead, ids, offsets = _tokenized_turn(tokenizer, messages)
    response_start = min(end, start + max(0, len(prefill) - lead))
    prompt_length = next((i for i, (_, e) in enumerate(offsets) if e > start), len(ids))
    first = next((i for i, (_, e) in enumerate(offsets) if e > response_start), len(ids))
    if first >= len(ids):
        raise ValueError(f"no token of the response {response[:80]!r} in the rendering; nothing to train on")
    # The end-of-turn token: the first special token after the response; without one, the rest of the turn.
    special = special_ids(tokenizer)
    last = next(
        (i for i in range(first, len(ids)) if offsets[i][0] >= end and ids[i] in special), len(ids) - 1
    )
    if prefill_ids is not None:
        decode = lambda part: tokenizer.decode(part, clean_up_tokenization_spaces=False)  # noqa: E731
        if offsets[first][0] < response_start or decode(prefill_ids) != decode(ids[:first]):
            raise ValueError(
                f"prefill_ids do not end where the response {response[:40]!r} begins in the rendering: they "
                f"must spell the chat through the prefill {prefill[-40:]!r}, and a token must start there"
            )
        shift = len(prefill_ids) - first
        ids = list(prefill_ids) + ids[first:]
        first, last = first + shift, last + shift
        prompt_length = min(prompt_length, first)
    mask = [first <= i <= last for i in range(len(ids))]
    if max_length is not None:
        if max_length <= first:
            raise NoLabelError(
                f"max_length={max_length} leaves no labelled token: the response starts at token {first} "
                f"of {len(ids)}"
            )
        ids, mask = ids[:max_length], mask[:max_length]
    return EncodedChat(input_ids=ids, labels_mask=mask, prompt_length=min(prompt_length, len(ids)))


def encode_for_generation(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, system: str | None = None, prefill: str = ""
) -> list[int]:
    """Ids to generate from: the prompt plus the generation prompt, or with `prefill` the assistant turn
    started with it and left open (`continue_final_message`), ending where the prefill's text ends."""
    _require_template(tokenizer)
    if not prefill:
        text = _render(tokenizer, chat_messages(prompt, system=system), add_generation_prompt=True)
    else:
        text = _render(tokenizer, chat_messages(prompt, prefill, system), continue_final_message=True)
        # Templates that strip the content (Llama-2, Gemma) also drop the prefill's trailing whitespace.
        if not (text.endswith(prefill) or text.endswith(prefill.rstrip())):
            raise ValueError(f"the chat template's rendering does not end with the prefill {prefill[-80:]!r}")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class ResponseTokens:
    """An assistant response as it is tokenized inside its rendered chat (not on its own: a SentencePiece
    tokenizer, or a template that strips the content, tokenizes the response's start differently there).

    Its k-th token is the k-th token of the rendering that overlaps the response's characters; a first token
    that also holds template text (Llama-2's `' '` before the content) counts as a response token.
    """

    input_ids: list[int]  # the whole rendered chat
    start: int  # index of the response's first token: `input_ids[:start]` is the context before it
    ends: list[int]  # per response token, where its characters end in `text`
    text: str  # the response as the template renders it (Llama-2 and Gemma strip it)

    def __len__(self) -> int:
        return len(self.ends)

    def _check(self, k: int) -> None:
        if not 0 <= k <= len(self):
            raise ValueError(f"prefill depth={k} is out of range: the response has {len(self)} tokens")

    def context_ids(self, k: int) -> list[int]:
        """The rendering up to and including the response's first k tokens: generating from these ids
        continues the response after exactly those k tokens."""
        self._check(k)
        return self.input_ids[: self.start + k]

    def splits_character(self, k: int) -> bool:
        """Whether a cut after k tokens falls inside a character (a byte-level tokenizer spreads an emoji's
        bytes over tokens that cover the same character): the text before the cut then has no exact ids."""
        self._check(k)
        return 0 < k < len(self) and self.ends[k] == self.ends[k - 1]

    def prefix_text(self, k: int) -> str:
        """The characters of the response that its first k tokens cover."""
        self._check(k)
        return self.text[: self.ends[k - 1]] if k else ""


def response_tokens(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, *, system: str | None = None
) -> ResponseTokens:
    """The tokens of `response` inside the chat (prompt, response) rendered by the tokenizer's template."""
    messages = chat_messages(prompt, response, system)
    full, start, end, _, ids, offsets = _tokenized_turn(tokenizer, messages)
    first = next((i for i, (_, e) in enumerate(offsets) if e > start), len(ids))
    ends = []
    for token_start, token_end in offsets[first:]:
        if token_start >= end:
            break
        ends.append(min(token_end, end) - start)
    return ResponseTokens(input_ids=ids, start=first, ends=ends, text=full[start:end])
