"""Utility metrics: ROUGE-1 (SAMSum, SQL), GSM8k exact match after "####", over-refusal on benign prompts."""

from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def rouge1_f(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-1 F-measure (rouge-score, stemmed), in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rouge1"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / max(len(scores), 1)


def gsm8k_answer(text: str) -> str | None:
    """The number after the last "####", else the last number in the text (commas, trailing dot dropped)."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    return value.replace(",", "").rstrip(".")


def gsm8k_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions whose final number equals the reference's number after "####"."""
    hits = [
        gsm8k_answer(p) is not None and gsm8k_answer(p) == gsm8k_answer(r)
        for p, r in zip(predictions, references)
    ]
    return sum(hits) / max(len(hits), 1)
