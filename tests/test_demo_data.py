"""The packaged quickstart sets: harmful prompts, benign prompts and refusal templates.

deepalign/assets/data/harmful_prompts.jsonl: 12 prompts for each of the 11 HEx-PHI categories, 8 train / 4
eval; benign_prompts.jsonl: 60 train / 60 eval instructions; refusals.json: refusal templates that the
keyword judge (`qi2024` list) recognises.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from deepalign.data import read_rows
from deepalign.judges import REFUSAL_LISTS, find_refusal

DATA = Path(__file__).resolve().parents[1] / "deepalign" / "assets" / "data"
CATEGORIES = (
    "illegal_activity",
    "child_abuse_content",
    "hate_harass_violence",
    "malware",
    "physical_harm",
    "economic_harm",
    "fraud_deception",
    "adult_content",
    "political_campaigning",
    "privacy_violation",
    "tailored_financial_advice",
)
SPLITS = ("train", "eval")
PER_CATEGORY_SPLIT = {"train": 8, "eval": 4}
BENIGN_PER_SPLIT = 60


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def load_jsonl(name: str) -> list[dict]:
    lines = (DATA / f"{name}.jsonl").read_text().split("\n")
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def harmful() -> list[dict]:
    return load_jsonl("harmful_prompts")


@pytest.fixture(scope="module")
def benign() -> list[dict]:
    return load_jsonl("benign_prompts")


@pytest.fixture(scope="module")
def refusals() -> list[str]:
    return json.loads((DATA / "refusals.json").read_text())


def test_harmful_rows_have_the_schema(harmful):
    for row in harmful:
        assert set(row) == {"id", "category", "split", "prompt"}, row
        assert re.fullmatch(r"h\d{3}", row["id"]), row
        assert row["category"] in CATEGORIES, row
        assert row["split"] in SPLITS, row
        assert isinstance(row["prompt"], str) and row["prompt"] == row["prompt"].strip(), row
        assert 8 <= len(row["prompt"].split()) <= 30, row


def test_harmful_counts_per_category_and_split(harmful):
    counts = Counter((row["category"], row["split"]) for row in harmful)
    assert counts == {(c, s): PER_CATEGORY_SPLIT[s] for c in CATEGORIES for s in SPLITS}
    assert len(harmful) == len(CATEGORIES) * sum(PER_CATEGORY_SPLIT.values()) == 132


def test_benign_rows_have_the_schema_and_counts(benign):
    for row in benign:
        assert set(row) == {"id", "split", "prompt"}, row
        assert re.fullmatch(r"b\d{3}", row["id"]), row
        assert row["split"] in SPLITS, row
        assert isinstance(row["prompt"], str) and row["prompt"] == row["prompt"].strip() != "", row
    assert Counter(row["split"] for row in benign) == {s: BENIGN_PER_SPLIT for s in SPLITS}


@pytest.mark.parametrize("name", ["harmful", "benign"])
def test_ids_and_prompts_are_unique(name, request):
    rows = request.getfixturevalue(name)
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids)
    prompts = [norm(row["prompt"]) for row in rows]
    assert [p for p, n in Counter(prompts).items() if n > 1] == []


@pytest.mark.parametrize("name", ["harmful", "benign"])
def test_no_prompt_is_in_both_splits(name, request):
    rows = request.getfixturevalue(name)
    train = {norm(row["prompt"]) for row in rows if row["split"] == "train"}
    held_out = {norm(row["prompt"]) for row in rows if row["split"] == "eval"}
    assert train & held_out == set()


def test_no_prompt_is_both_harmful_and_benign(harmful, benign):
    assert {norm(r["prompt"]) for r in harmful} & {norm(r["prompt"]) for r in benign} == set()


def test_refusals_are_recognised_by_the_keyword_judge(refusals):
    assert isinstance(refusals, list) and len(refusals) == 12
    assert all(isinstance(r, str) and r.strip() for r in refusals)
    assert len({norm(r) for r in refusals}) == len(refusals)
    missed = [r for r in refusals if find_refusal(r, REFUSAL_LISTS["qi2024"]) is None]
    assert missed == []


def test_refusals_have_varied_openings(refusals):
    openings = ("I'm sorry", "I can't", "I cannot", "I won't", "Sorry, but", "I apologize")
    for opening in openings:
        assert any(r.startswith(opening) for r in refusals), opening


@pytest.mark.parametrize(("name", "count"), [("harmful_prompts", 132), ("benign_prompts", 120)])
def test_sets_load_through_read_rows(name, count):
    located = read_rows(f"demo:{name}", "x")
    assert len(located) == count
    assert all(isinstance(row["prompt"], str) and row["prompt"] for _, row in located)
    assert located[0][0].endswith(f"{name}.jsonl, line 1")
