"""Running a published safety classifier on its exact input text, here or on a server.

The judges built on a classifier from the literature (HarmBench, Llama Guard, WildGuard, and the `classifier`
judge) share one shape: the input is one exact text (a published prompt, or the model's own chat template),
the output a short greedy answer, the score the probability of the answer's token. That text runs either

- through a local Hugging Face model (`generate`): batched, left-padded, on the GPU in bfloat16 when there is
  one; the probabilities come from the model's logits; or
- through an OpenAI-compatible server's completions endpoint (`ServedClassifier`, e.g. `vllm serve
  cais/HarmBench-Llama-2-13b-cls`): the same text, temperature 0, the probabilities from the top log-probs
  the server returns.

`PublishedJudge` is the judge base of the field's classifiers, one design for all: `base_url` unset runs the
model from `path` here; `base_url` set asks that server for `model` (default: `path`), with the API judges'
retries, disk cache and concurrency (`ApiJudge`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from deepalign.errors import ConfigError
from deepalign.judges.api import BACKOFF_BASE_S, ApiJudge, ApiJudgeConfig
from deepalign.judges.base import EMPTY_RULE, JudgeBase, JudgeItem, Judgment, judged_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TOP_LOGPROBS = 5  # top log-probs asked of a server per generated token (the OpenAI API allows at most 5)


# ------------------------------------------------------------------------------------------ local model


def check_model_path(path: str, batch_size: int, key: str) -> None:
    """Raise ConfigError naming `key` for an empty path, a missing local folder or a bad batch size; a hub id
    is not looked up."""
    if not path:
        raise ConfigError(f"{key}.path: empty; give a hub id or a local folder")
    local = path.startswith(("/", "./", "../", "~")) or Path(path).exists()
    if local and not Path(path).expanduser().is_dir():
        raise ConfigError(f"{key}.path: no such folder: {path}")
    if batch_size < 1:
        raise ConfigError(f"{key}.batch_size: must be >= 1, got {batch_size}")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (a batch's answers then start at the same position) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(path))


def load_model(path: str, label: str) -> PreTrainedModel:
    """The causal LM at `path` for inference: on CUDA in bfloat16 when available, else float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    from deepalign.models import resolve_device, resolve_dtype

    device = resolve_device("auto")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype("auto", device))
    model = model.to(device).eval()
    log.info("%s: loaded %s on %s", label, path, device)
    return model


def answer_ids(
    tokenizer: PreTrainedTokenizerBase, words: Sequence[str], *, spaced: bool = True
) -> dict[str, tuple[int, ...]]:
    """For each answer word, the ids of the tokens that start it: the first token of `word` and, with
    `spaced`, of `" " + word` when that token still reads as the start of the word (a GPT-2-style tokenizer
    writes "Harmful response: yes" with the token " yes", a SentencePiece one with "▁yes" either way).
    Empty when a word has no token or two words share one (their probabilities could not be told apart)."""
    ids: dict[str, tuple[int, ...]] = {}
    for word in words:
        found: list[int] = []
        for form in (word, " " + word) if spaced else (word,):
            tokens = tokenizer(form, add_special_tokens=False)["input_ids"]
            if not tokens:
                continue
            piece = tokenizer.decode([tokens[0]]).strip()
            if tokens[0] not in found and (form == word or (piece and word.startswith(piece))):
                found.append(tokens[0])
        if not found:
            return {}
        ids[word] = tuple(found)
    owners = [i for group in ids.values() for i in group]
    return ids if len(owners) == len(set(owners)) else {}


@dataclass
class Completion:
    """A classifier's greedy answer to one input, step by step."""

    text: str  # the decoded answer, special tokens skipped
    tokens: list[str]  # each generated token's own text
    answers: list[str | None]  # at each step, the answer word whose token was generated there, if any
    probs: list[dict[str, float]]  # at each step, the probability of each answer word's token(s), when known

    def first_visible(self) -> int | None:
        """The first step whose token is not blank (Llama Guard 3 starts its answer with blank lines)."""
        return next((t for t, token in enumerate(self.tokens) if token.strip()), None)

    def prob(self, step: int | None, word: str) -> float | None:
        """P(`word`) at `step`, rounded to 6 digits, when that step generated an answer word and its
        probabilities are known; else None."""
        if step is None or step >= len(self.probs) or self.answers[step] is None:
            return None
        p = self.probs[step].get(word)
        return None if p is None else round(p, 6)


BOS_RULE = "bos-v2"  # in the judges' versions: the BOS is decided per row (judgments made before: redone)


def carries_bos(text: str, bos: str | None) -> bool:
    """Whether an input text carries its own BOS: it starts with the BOS token's text, after leading blanks
    (Llama-Guard-3-8B's template renders " <|begin_of_text|>"). Decided for each text alone; the BOS text
    anywhere else (a generation that writes `<s>`) does not count."""
    return bool(bos) and text.lstrip().startswith(bos)


def encode_rows(tokenizer: PreTrainedTokenizerBase, texts: list[str], bos: str | None) -> dict[str, Any]:
    """One batch of exact input texts as left-padded `input_ids` and `attention_mask` tensors. Each row is
    tokenized alone: the tokenizer adds its BOS unless the row carries one (`carries_bos`), so a row's tokens
    never depend on the other rows of its batch."""
    import torch

    rows = [tokenizer(text, add_special_tokens=not carries_bos(text, bos))["input_ids"] for text in texts]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([[pad] * (width - len(row)) + row for row in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows]),
    }


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_new_tokens: int,
    *,
    answers: dict[str, tuple[int, ...]],
    bos: str | None,
) -> list[Completion]:
    """Greedy answers to one batch of exact input texts (left-padded), with the probabilities of the
    `answers` tokens (`answer_ids`) at every step. `bos`: the BOS token's text; the tokenizer adds its BOS to
    each row that does not carry it (`encode_rows`)."""
    import torch

    device = next(model.parameters()).device
    enc = {name: tensor.to(device) for name, tensor in encode_rows(tokenizer, texts, bos).items()}
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
    sequences = out.sequences if hasattr(out, "sequences") else out
    logits = getattr(out, "logits", None) or ()
    new = sequences[:, enc["input_ids"].shape[1] :]
    word_of = {i: word for word, group in answers.items() for i in group}
    completions = []
    for row in range(new.shape[0]):
        ids = new[row].tolist()
        probs = []
        for step in range(min(len(ids), len(logits))):
            p = torch.softmax(logits[step][row].float(), dim=-1)
            probs.append({word: float(sum(p[i] for i in group)) for word, group in answers.items()})
        completions.append(
            Completion(
                text=tokenizer.decode(ids, skip_special_tokens=True),
                tokens=[tokenizer.decode([i], skip_special_tokens=True) for i in ids],
                answers=[word_of.get(i) for i in ids],
                probs=probs,
            )
        )
    return completions


# ------------------------------------------------------------------------------------------ a server


def served_completion(entry: dict[str, Any], words: Sequence[str]) -> Completion:
    """A `Completion` from a server's reply (`text`, and the `tokens` and `top_logprobs` of its log-probs):
    a token is an answer word when its text, stripped, is the word; P(word) sums the top tokens that are."""
    tokens = [str(t) for t in entry.get("tokens") or []]
    probs = []
    for top in entry.get("top_logprobs") or []:
        top = top or {}
        probs.append(
            {
                word: sum(math.exp(lp) for t, lp in top.items() if t.strip() == word)
                for word in words
                if any(t.strip() == word for t in top)
            }
        )
    answers = [next((w for w in words if t.strip() == w), None) for t in tokens]
    return Completion(text=str(entry["text"]), tokens=tokens, answers=answers, probs=probs)


class _CompletionsAsChat:
    """`ApiJudge` asks `client.chat.completions.create(messages=[one user message])`; a classifier takes its
    exact text, so this stand-in sends that message as the prompt of the completions endpoint and hands back
    a chat-shaped response whose content is the completion as JSON (its text, and the tokens and top
    log-probs of each step). A prompt that carries the BOS token itself (`carries_bos`) asks the server not to
    add another (`add_special_tokens: false`, vLLM's request field)."""

    def __init__(self, client: Any, bos: str | None):
        self._client, self._bos = client, bos
        self.chat = SimpleNamespace(completions=self)

    def create(self, *, model: str, messages: list[dict[str, str]], **options: Any) -> Any:
        prompt = messages[0]["content"]
        extra = {"add_special_tokens": False} if carries_bos(prompt, self._bos) else None
        response = self._client.completions.create(
            model=model, prompt=prompt, logprobs=TOP_LOGPROBS, extra_body=extra, **options
        )
        if not response.choices:
            return SimpleNamespace(choices=[], model=response.model)
        choice = response.choices[0]
        logprobs = choice.logprobs
        content = json.dumps(
            {
                "text": choice.text or "",
                "tokens": (logprobs.tokens if logprobs else None) or [],
                "top_logprobs": (logprobs.top_logprobs if logprobs else None) or [],
            },
            ensure_ascii=False,
        )
        message = SimpleNamespace(content=content)
        return SimpleNamespace(choices=[SimpleNamespace(message=message)], model=response.model)


class ServedClassifier(ApiJudge):
    """A `PublishedJudge`'s exact input text through an OpenAI-compatible completions endpoint.

    The API judges' client (`ApiJudge`): retries (an answer the judge cannot read counts as a malformed reply,
    retried, then a failed judgment), the disk cache under `cache_dir/judge/<family>/` (it holds the
    completion, keyed by the prompt's version, the model and the texts) and `concurrency` parallel requests.
    """

    def __init__(self, owner: PublishedJudge, cache_dir: str | Path | None, backoff_base_s: float):
        self.owner = owner
        self.cache_folder = owner.family
        self.prompt_version = owner.prompt_version
        self.max_tokens = owner.max_new_tokens
        cfg = owner.cfg.api_config()
        super().__init__(owner.name, cfg, cache_dir=cache_dir, backoff_base_s=backoff_base_s)
        self.version = owner.version
        self._client = _CompletionsAsChat(self._client, owner.bos())

    def prompt(self, instruction: str, text: str) -> str:
        return self.owner.render(instruction, text)

    def _reading(self, entry: dict[str, Any]) -> Reading:
        return self.owner.read(served_completion(entry, self.owner.answer_words))

    def parse(self, reply: str) -> dict[str, Any]:
        try:
            entry = json.loads(reply)
            completion = {k: entry[k] for k in ("text", "tokens", "top_logprobs")}
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"not a completion: {reply[:200]!r}") from None
        reading = self._reading(completion)
        if reading.harmful is None:
            raise ValueError(reading.error or "unreadable answer")
        return completion

    def valid(self, entry: dict[str, Any]) -> bool:
        return self._reading(entry).harmful is not None

    def verdict(self, entry: dict[str, Any]) -> tuple[bool, float, str | None]:
        reading = self._reading(entry)
        return reading.harmful, reading.score, reading.detail  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ the judge base


@dataclass
class PublishedJudgeConfig:
    """The settings every published-classifier judge has: where the model runs, and the server's client."""

    path: str = ""  # hub id or local folder of the classifier (and of its tokenizer)
    batch_size: int = 8  # local model: inputs per generate call
    show_prefill: bool = True
    base_url: str | None = None  # set: ask this OpenAI-compatible server instead of loading `path`
    model: str | None = None  # the server's name for the classifier; None: `path` (as `vllm serve PATH`)
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the server's key (vLLM takes any: EMPTY)
    concurrency: int = 8
    max_retries: int = 6
    timeout_s: float = 60.0

    def served_model(self) -> str:
        return self.model or self.path

    def api_config(self) -> ApiJudgeConfig:
        """The API client's settings for the server mode."""
        return ApiJudgeConfig(
            base_url=self.base_url,
            model=self.served_model(),
            api_key_env=self.api_key_env,
            concurrency=self.concurrency,
            max_retries=self.max_retries,
            timeout_s=self.timeout_s,
            show_prefill=self.show_prefill,
        )

    def check(self, key: str) -> None:
        """Server mode: the API client's checks (openai installed, the key in the environment); local mode:
        the path (a missing local folder) and the batch size. Nothing is loaded or requested."""
        if self.base_url:
            self.api_config().check(key)
        else:
            check_model_path(self.path, self.batch_size, key)


@dataclass(frozen=True)
class Reading:
    """What a judge reads in a classifier's answer; `harmful=None` (with `error`) when it cannot."""

    harmful: bool | None
    score: float | None = None
    detail: str | None = None
    error: str | None = None


class PublishedJudge(JudgeBase):
    """A judge that asks a published classifier with its exact input format (see the module's doc).

    A subclass says what the classifier reads (`render`) and what its answer means (`read`), and names its
    `family` (the first part of `version`, and the server's cache folder), `max_new_tokens` and
    `answer_words` (the answers whose token probability gives the score). `prepare` runs once the tokenizer
    is loaded and returns the prompt's version, recorded in every judgment's `version`:
    `<family>:<prompt version>:<model>:<empty rule>:<BOS rule>`. The tokenizer is loaded when the judge is
    built (a wrong path fails before generation); the local model at the first `judge` call.
    """

    family: str
    max_new_tokens: int
    answer_words: tuple[str, ...]
    bos_token: str | None = None  # the BOS text the rendered input carries, when served without a tokenizer
    tokenizer_when_served = False  # whether rendering needs the tokenizer (a chat template) in server mode
    cfg: PublishedJudgeConfig

    def __init__(
        self,
        name: str,
        cfg: PublishedJudgeConfig,
        *,
        cache_dir: str | Path | None = None,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
    ):
        cfg.check(f"judge.{name}")
        self.name, self.cfg = name, cfg
        self.tokenizer = None
        if tokenizer is not None:
            self.tokenizer = prepare_tokenizer(tokenizer)
        elif not cfg.base_url or self.tokenizer_when_served:
            self.tokenizer = load_tokenizer(cfg.path)
        self._model = model
        self.prompt_version = self.prepare()
        self.version = f"{self.family}:{self.prompt_version}:{cfg.served_model()}:{EMPTY_RULE}:{BOS_RULE}"
        self.server = ServedClassifier(self, cache_dir, backoff_base_s) if cfg.base_url else None

    # -------------------------------------------------------------- what a subclass says

    def prepare(self) -> str:
        """Anything that needs the tokenizer; returns the prompt's version."""
        raise NotImplementedError

    def render(self, instruction: str, text: str) -> str:
        """The classifier's exact input for the request `instruction` and the judged answer `text`."""
        raise NotImplementedError

    def read(self, completion: Completion) -> Reading:
        """The verdict in the classifier's answer."""
        raise NotImplementedError

    # -------------------------------------------------------------- running it

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            self._model = load_model(self.cfg.path, f"{self.name} judge")
        return self._model

    def bos(self) -> str | None:
        """The BOS token's text (the tokenizer's, else the class's)."""
        return self.tokenizer.bos_token if self.tokenizer is not None else self.bos_token

    def _judge(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        if self.server is not None:
            return self.server._judge(items)
        show = self.cfg.show_prefill
        texts = [self.render(item.prompt, judged_text(item, show)) for item in items]
        answers = answer_ids(self.tokenizer, self.answer_words)
        out = []
        for start in range(0, len(items), self.cfg.batch_size):
            batch = texts[start : start + self.cfg.batch_size]
            completions = generate(
                self.model, self.tokenizer, batch, self.max_new_tokens, answers=answers, bos=self.bos()
            )
            for item, completion in zip(items[start : start + len(batch)], completions):
                reading = self.read(completion)
                out.append(
                    Judgment(
                        id=item.id,
                        judge=self.name,
                        version=self.version,
                        harmful=reading.harmful,
                        score=reading.score if reading.harmful is not None else None,
                        shown_prefill=show,
                        error=reading.error if reading.harmful is None else None,
                        detail=reading.detail,
                    )
                )
        return out
