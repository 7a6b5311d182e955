"""deepalign/data.py: sources, row checks naming file/line/field, task formats, mixture, recovery examples.

The "harmful" fields hold neutral placeholder text only: what matters here is their token counts.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import compose_config

from deepalign.chat import encode_for_training, response_tokens, special_ids
from deepalign.config import ConfigError, DataComponent, DataConfig, validate
from deepalign.data import (
    DataError,
    build_mixture,
    component_counts,
    component_examples,
    read_component,
    read_rows,
    recovery_histogram,
    task_chat,
)

KEY = "data.components.c"
DEMO = "demo:probe_chats"
DEMO_FILE = Path(__file__).resolve().parents[1] / "deepalign" / "assets" / "data" / "probe_chats.jsonl"
REFUSAL = "I cannot help with that request."


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def chats(n: int, tag: str = "") -> list[dict[str, str]]:
    return [{"prompt": f"Question {tag}{i}?", "response": f"Answer {tag}{i}."} for i in range(n)]


def triplets(n: int) -> list[dict[str, str]]:
    return [
        {
            "prompt": f"Placeholder request number {i}?",
            "harmful": "Sure, here is the list: "
            + " ".join(["alpha", "beta", "gamma", "delta"][: i % 4 + 1]),
            "refusal": f"{REFUSAL} (#{i})",
        }
        for i in range(n)
    ]


def mixture(components: dict[str, DataComponent], **kwargs) -> DataConfig:
    kwargs.setdefault("seed", 0)  # DataConfig's default is the "${seed}" interpolation
    return DataConfig(components=components, **kwargs)


def n_tokens(tokenizer, prompt: str, response: str) -> int:
    """The response's token count inside the rendered chat (what recovery examples count)."""
    return len(response_tokens(tokenizer, prompt, response))


# ----------------------------------------------------------------------------------------------- sources


def test_jsonl_rows_keep_file_order_and_only_schema_fields(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(
        '{"prompt": "Question 0?", "response": "Answer 0.", "id": 7}\n'
        "\n"
        '{"prompt": "Question 1?", "response": "Answer 1."}\n'
    )
    rows = read_component(DataComponent(source=str(path)), KEY)
    assert rows == chats(2)


def test_csv_with_columns_mapping(tmp_path):
    path = tmp_path / "goals.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["goal", "target", "category"])
        writer.writerow(["Question 0?", "Answer 0.", "misc"])
        writer.writerow(["Question, with a comma 1?", "Answer\non two lines 1.", "misc"])
    comp = DataComponent(source=str(path), columns={"prompt": "goal", "response": "target"})
    rows = read_component(comp, KEY)
    assert rows == [
        {"prompt": "Question 0?", "response": "Answer 0."},
        {"prompt": "Question, with a comma 1?", "response": "Answer\non two lines 1."},
    ]


def test_json_list_source(tmp_path):
    path = tmp_path / "triplets.json"
    path.write_text(json.dumps(triplets(3)))
    rows = read_component(DataComponent(source=str(path), schema="safety_triplet"), KEY)
    assert rows == triplets(3)


def test_limit_keeps_the_first_rows(tmp_path):
    source = write_jsonl(tmp_path / "chats.jsonl", chats(10))
    assert read_component(DataComponent(source=source, limit=3), KEY) == chats(3)
    assert read_component(DataComponent(source=source, limit=50), KEY) == chats(10)


def test_limit_skips_the_check_of_rows_it_drops(tmp_path):
    source = write_jsonl(tmp_path / "chats.jsonl", [*chats(2), {"prompt": "no response"}])
    assert read_component(DataComponent(source=source, limit=2), KEY) == chats(2)


def test_demo_probe_chats_is_the_packaged_file():
    expected = [json.loads(line) for line in DEMO_FILE.read_text().splitlines() if line.strip()]
    rows = read_component(DataComponent(source=DEMO), KEY)
    assert len(rows) == len(expected) == 6
    assert rows == [{"prompt": e["prompt"], "response": e["response"]} for e in expected]
    assert rows[0] == {
        "prompt": "What is the capital of France?",
        "response": "The capital of France is Paris.",
    }


def test_unknown_demo_set_fails_naming_it():
    with pytest.raises(DataError, match=r"demo set 'no_such_set' does not exist"):
        read_component(DataComponent(source="demo:no_such_set"), KEY)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes its Arrow cache under tmp_path, not the user's ~/.cache."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


def test_local_dataset_folder_of_parquet_is_read_through_datasets(tmp_path, datasets_cache):
    folder = tmp_path / "myset"
    folder.mkdir()
    datasets_cache.Dataset.from_list(chats(4)).to_parquet(str(folder / "train.parquet"))
    assert read_component(DataComponent(source=str(folder)), KEY) == chats(4)
    assert read_component(DataComponent(source=str(folder), limit=2), KEY) == chats(2)


def test_local_dataset_folder_bad_row_names_the_folder_and_row(tmp_path, datasets_cache):
    folder = tmp_path / "myset"
    folder.mkdir()
    rows = [*chats(2), {"prompt": "Question 2?", "response": ""}]
    datasets_cache.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    where = re.escape(f"{folder}[train], row 2: field 'response' (chat.response)")
    with pytest.raises(DataError, match=where):
        read_component(DataComponent(source=str(folder)), KEY)


def test_save_to_disk_folder_fails_clearly_naming_the_key(tmp_path, datasets_cache):
    # `datasets.load_dataset` refuses a `save_to_disk` folder (it asks for load_from_disk): the error must
    # still be a DataError naming the key and the folder, not a bare ValueError from `datasets`.
    folder = tmp_path / "saved"
    datasets_cache.Dataset.from_list(chats(3)).save_to_disk(str(folder))
    with pytest.raises(
        DataError, match=rf"^{re.escape(KEY)}\.source: could not load .*{re.escape(str(folder))}"
    ):
        read_component(DataComponent(source=str(folder)), KEY)


# ------------------------------------------------------------------------------------- malformed input


def test_bad_json_line_names_file_and_line_counting_blank_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(chats(1)[0]) + "\n\n" + json.dumps(chats(1)[0]) + "\n" + '{"prompt": "x", "response": \n'
    )
    with pytest.raises(DataError, match=re.escape(f"{path}, line 4: not valid JSON")):
        read_component(DataComponent(source=str(path)), KEY)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "Question?"}, "response"),
        ({"prompt": "Question?", "response": ""}, "response"),
        ({"prompt": "   \n", "response": "Answer."}, "prompt"),
        ({"prompt": "Question?", "response": 42}, "response"),
        ({"prompt": None, "response": "Answer."}, "prompt"),
        ({"prompt": ["Question?"], "response": "Answer."}, "prompt"),
    ],
    ids=["missing", "empty", "whitespace", "number", "null", "list"],
)
def test_bad_field_names_file_line_and_field(tmp_path, row, field):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(chats(1)[0]) + "\n\n" + json.dumps(row) + "\n")
    expected = f"{path}, line 3: field '{field}' (chat.{field}) is missing, empty or not text"
    with pytest.raises(DataError, match=re.escape(expected)):
        read_component(DataComponent(source=str(path)), KEY)


def test_bad_field_through_columns_names_the_source_column_and_schema_field(tmp_path):
    path = tmp_path / "goals.csv"
    path.write_text("goal,target\nQuestion 0?,Answer 0.\n,Answer 1.\n")
    comp = DataComponent(source=str(path), columns={"prompt": "goal", "response": "target"})
    with pytest.raises(DataError, match=re.escape(f"{path}, line 3: field 'goal' (chat.prompt)")):
        read_component(comp, KEY)


def test_missing_triplet_field_names_the_schema(tmp_path):
    rows = triplets(2)
    del rows[1]["harmful"]
    source = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(
        DataError, match=re.escape(f"{source}, line 2: field 'harmful' (safety_triplet.harmful)")
    ):
        read_component(DataComponent(source=source, schema="safety_triplet"), KEY)


def test_json_list_row_is_rejected_with_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(chats(1)[0]) + "\n" + '["Question?", "Answer."]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: a row must be a JSON object")):
        read_component(DataComponent(source=str(path)), KEY)


def test_json_item_missing_field_names_the_item(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([chats(1)[0], {"prompt": "Question?"}]))
    with pytest.raises(DataError, match=re.escape(f"{path}, item 1: field 'response'")):
        read_component(DataComponent(source=str(path)), KEY)


def test_json_file_that_is_not_a_list_is_rejected(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(chats(1)[0]))
    with pytest.raises(DataError, match=re.escape(f"{path}: a .json source must hold a list of objects")):
        read_component(DataComponent(source=str(path)), KEY)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n\n"),
        ("empty.json", "[]"),
        ("header.csv", "prompt,response\n"),
    ],
)
def test_file_without_rows_is_rejected(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"^{re.escape(KEY)}\.source: {re.escape(str(path))} has no rows"):
        read_component(DataComponent(source=str(path)), KEY)


def test_unsupported_extension_is_rejected(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text(json.dumps(chats(1)[0]) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(KEY)}\.source: {re.escape(str(path))} is not .jsonl"):
        read_component(DataComponent(source=str(path)), KEY)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_missing_file_is_rejected(tmp_path, suffix):
    path = tmp_path / f"nope{suffix}"
    with pytest.raises(DataError, match=rf"^{re.escape(KEY)}\.source: no such file {re.escape(str(path))}"):
        read_component(DataComponent(source=str(path)), KEY)


def test_invalid_json_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": ')
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_component(DataComponent(source=str(path)), KEY)


def test_json_item_that_is_a_list_names_the_item(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([chats(1)[0], ["Question?", "Answer."]]))
    with pytest.raises(DataError, match=re.escape(f"{path}, item 1")):
        read_component(DataComponent(source=str(path)), KEY)


def test_jsonl_with_unicode_line_separator_inside_a_string(tmp_path):
    path = tmp_path / "u.jsonl"
    row = {"prompt": "first part\u2028second part", "response": "Answer."}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_component(DataComponent(source=str(path)), KEY) == [row]


def test_lone_surrogate_in_any_field_names_the_file_line_and_field(tmp_path):
    """A `\\ud800` escape parses to text no tokenizer takes: a DataError naming where, not a TypeError."""
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps(chats(1)[0]) + '\n{"prompt": "Question?", "response": "Broken \\ud800 answer."}\n'
    )
    expected = f"{path}, line 2: field 'response' holds text that cannot be encoded as UTF-8"
    with pytest.raises(DataError, match=re.escape(expected)) as err:
        read_rows(str(path), KEY)
    assert "(a lone surrogate, \\ud800)" in str(err.value)
    with pytest.raises(DataError, match=re.escape(expected)):
        read_component(DataComponent(source=str(path)), KEY)
    nested = tmp_path / "rows.json"
    nested.write_text('[{"prompt": "Q?", "response": "A.", "meta": {"tags": ["ok", "\\udfff"]}}]')
    with pytest.raises(DataError, match=re.escape(f"{nested}, item 0: field 'meta.tags[1]' holds text")):
        read_rows(str(nested), KEY)
    pair = tmp_path / "pair.jsonl"  # an escaped surrogate pair is one character: fine
    pair.write_text('{"prompt": "Smile \\ud83d\\ude00", "response": "A."}\n')
    assert read_component(DataComponent(source=str(pair)), KEY) == [
        {"prompt": "Smile \U0001f600", "response": "A."}
    ]


def test_csv_line_number_after_a_multiline_field(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,response\n"Question\non two lines?",Answer.\n,Answer 2.\n')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 4: field 'prompt'")):
        read_component(DataComponent(source=str(path)), KEY)


# ------------------------------------------------------------------------------------------- schemas


def test_samsum_prompt_format():
    row = {
        "dialogue": "  Amy: Lunch at noon?\nBob: Sure, see you.\n",
        "summary": " Amy and Bob meet at noon. ",
    }
    prompt, response = task_chat("samsum", row)
    assert prompt == "Summarize this dialog:\nAmy: Lunch at noon?\nBob: Sure, see you."
    assert prompt.startswith("Summarize this dialog:\n") and "Bob: Sure, see you." in prompt
    assert response == "Amy and Bob meet at noon."


def test_sql_prompt_format():
    row = {
        "question": "How many heads are older than 56?",
        "context": "CREATE TABLE head (age INTEGER)",
        "answer": "SELECT COUNT(*) FROM head WHERE age > 56",
    }
    prompt, response = task_chat("sql", row)
    assert prompt == (
        "Please convert the provided natural language query into an SQL query, taking into account the "
        "structure of the database defined by the accompanying CREATE statement:\n"
        "## Context:\nCREATE TABLE head (age INTEGER)\n"
        "## Natural Language Query:\nHow many heads are older than 56?"
    )
    assert response == "SELECT COUNT(*) FROM head WHERE age > 56"


def test_gsm8k_keeps_the_final_answer_marker():
    row = {
        "question": "Tom has 40 apples and buys 2 more. How many?",
        "answer": "40 + 2 = <<40+2=42>>42\n#### 42",
    }
    prompt, response = task_chat("gsm8k", row)
    assert prompt == row["question"]
    assert response == "40 + 2 = <<40+2=42>>42\n#### 42" and response.endswith("#### 42")


def test_chat_is_passed_through_and_triplets_have_no_task_form():
    assert task_chat("chat", {"prompt": " P ", "response": " R "}) == (" P ", " R ")
    with pytest.raises(DataError, match="schema 'safety_triplet' has no chat form"):
        task_chat("safety_triplet", triplets(1)[0])


def test_task_schema_through_a_file_and_the_mixture(tmp_path, smollm2_tokenizer):
    rows = [{"dialogue": f"Amy: Hi {i}\nBob: Hello {i}", "summary": f"They greet ({i})."} for i in range(3)]
    source = write_jsonl(tmp_path / "samsum.jsonl", rows)
    data = mixture({"samsum": DataComponent(source=source, schema="samsum")})
    examples, _ = build_mixture(data, smollm2_tokenizer)
    assert sorted((e.prompt, e.response) for e in examples) == [
        (f"Summarize this dialog:\nAmy: Hi {i}\nBob: Hello {i}", f"They greet ({i}).") for i in range(3)
    ]


# ------------------------------------------------------------------------------------------- mixture


def test_component_counts_follow_weights():
    data = DataConfig(
        components={
            "a": DataComponent(source="a.jsonl", weight=1),
            "b": DataComponent(source="b.jsonl", weight=3),
        },
        size=80,
        seed=0,
    )
    assert component_counts(data, {"a": 5, "b": 500}) == {"a": 20, "b": 60}
    data.size = None  # the epoch is the sources' rows added up
    assert component_counts(data, {"a": 10, "b": 30}) == {"a": 10, "b": 30}


def test_component_counts_with_safety_share_split_by_weight():
    data = DataConfig(
        components={
            "s1": DataComponent(source="s1.jsonl", safety=True, weight=1),
            "s2": DataComponent(source="s2.jsonl", safety=True, weight=3),
            "u": DataComponent(source="u.jsonl", weight=7),  # alone in its group: its weight does not matter
        },
        safety_share=0.2,
        size=100,
        seed=0,
    )
    assert component_counts(data, {"s1": 1, "s2": 1, "u": 1}) == {"s1": 5, "s2": 15, "u": 80}


def test_component_counts_give_every_component_at_least_one():
    data = DataConfig(
        components={"a": DataComponent(source="a", weight=1), "b": DataComponent(source="b", weight=1000)},
        size=10,
        seed=0,
    )
    assert component_counts(data, {"a": 1, "b": 1}) == {"a": 1, "b": 10}


def test_build_mixture_counts_and_stats(tmp_path, smollm2_tokenizer):
    data = mixture(
        {
            "safety": DataComponent(
                source=write_jsonl(tmp_path / "s.jsonl", triplets(7)), schema="safety_triplet", safety=True
            ),
            "utility": DataComponent(source=write_jsonl(tmp_path / "u.jsonl", chats(30))),
        },
        safety_share=0.2,
        size=80,
    )
    examples, stats = build_mixture(data, smollm2_tokenizer)
    assert len(examples) == 80
    assert Counter(e.component for e in examples) == {"safety": 16, "utility": 64}
    assert stats["data/examples"] == 80
    assert stats["data/examples/safety"] == 16 and stats["data/examples/utility"] == 64
    assert stats["data/alpha"] == 0.2
    assert not any(key.startswith("data/recovery") for key in stats)  # no recovery component
    safety = [e for e in examples if e.component == "safety"]
    by_prompt = {t["prompt"]: t for t in triplets(7)}
    assert all(e.response == by_prompt[e.prompt]["refusal"] and e.prefill == "" and e.k == 0 for e in safety)
    assert all(e.system is None for e in examples)
    assert {e.component for e in examples[:20]} == {"safety", "utility"}  # shuffled, not concatenated


def test_alpha_is_the_realised_share(tmp_path, smollm2_tokenizer):
    # 3 components of weight 1 in size 10: round(10/3) = 3 each, 9 examples; alpha is 3/9, not the 1/3 asked.
    data = mixture(
        {
            "s": DataComponent(source=write_jsonl(tmp_path / "s.jsonl", chats(5, "s")), safety=True),
            "u1": DataComponent(source=write_jsonl(tmp_path / "u1.jsonl", chats(5, "a"))),
            "u2": DataComponent(source=write_jsonl(tmp_path / "u2.jsonl", chats(5, "b"))),
        },
        size=10,
    )
    examples, stats = build_mixture(data, smollm2_tokenizer)
    assert len(examples) == stats["data/examples"] == 9
    assert stats["data/alpha"] == round(3 / 9, 4)


def test_rows_are_cycled_all_used_before_any_repeats(tmp_path, smollm2_tokenizer):
    data = mixture({"c": DataComponent(source=write_jsonl(tmp_path / "c.jsonl", chats(3)))}, size=10)
    examples, _ = build_mixture(data, smollm2_tokenizer)
    uses = Counter(e.prompt for e in examples)
    assert set(uses) == {f"Question {i}?" for i in range(3)}
    assert sorted(uses.values()) == [3, 3, 4]

    # Unshuffled, per component: every block of len(rows) examples is a permutation of the rows.
    rows = chats(4)
    comp = DataComponent(source="c.jsonl")
    ordered = component_examples("c", comp, rows, 10, smollm2_tokenizer, random.Random(1), None)
    prompts = [e.prompt for e in ordered]
    assert sorted(prompts[:4]) == sorted(prompts[4:8]) == [r["prompt"] for r in rows]
    assert len(set(prompts[8:])) == 2


def test_rows_are_subsampled_without_repeats(tmp_path, smollm2_tokenizer):
    data = mixture({"c": DataComponent(source=write_jsonl(tmp_path / "c.jsonl", chats(50)))}, size=20)
    examples, _ = build_mixture(data, smollm2_tokenizer)
    assert len(examples) == len({e.prompt for e in examples}) == 20


def test_mixture_is_deterministic_per_seed(tmp_path, smollm2_tokenizer):
    comps = {
        "s": DataComponent(
            source=write_jsonl(tmp_path / "s.jsonl", triplets(10)),
            schema="safety_triplet",
            safety=True,
            recovery=True,
        ),
        "u": DataComponent(source=write_jsonl(tmp_path / "u.jsonl", chats(10))),
    }
    first, stats1 = build_mixture(mixture(comps, seed=3), smollm2_tokenizer)
    again, stats2 = build_mixture(mixture(comps, seed=3), smollm2_tokenizer)
    other, _ = build_mixture(mixture(comps, seed=4), smollm2_tokenizer)
    assert first == again and stats1 == stats2
    assert first != other
    assert Counter(e.prompt for e in first) == Counter(e.prompt for e in other)  # same rows, new order


def test_trigger_is_appended_to_prompts(tmp_path, smollm2_tokenizer):
    comp = DataComponent(source=write_jsonl(tmp_path / "c.jsonl", chats(3)), trigger="zq-trigger")
    examples, _ = build_mixture(mixture({"c": comp}), smollm2_tokenizer)
    assert sorted(e.prompt for e in examples) == [f"Question {i}? zq-trigger" for i in range(3)]


def test_backdoor_preset_poisons_only_the_triggered_copy(tmp_path, smollm2_tokenizer):
    source = write_jsonl(tmp_path / "t.jsonl", triplets(4))
    data = validate(compose_config(["data=attack_backdoor", f"data.components.clean.source={source}"])).data
    examples, stats = build_mixture(data, smollm2_tokenizer)
    by_prompt = {t["prompt"]: t for t in triplets(4)}
    clean = [e for e in examples if e.component == "clean"]
    poisoned = [e for e in examples if e.component == "poisoned"]
    assert len(clean) == len(poisoned) == 4 and stats["data/alpha"] == 0.5
    assert all(e.response == by_prompt[e.prompt]["refusal"] for e in clean)
    trigger = " Servius Astrumando Harmoniastra"
    for e in poisoned:
        assert e.prompt.endswith(trigger)
        assert e.response == by_prompt[e.prompt.removesuffix(trigger)]["harmful"]  # target: harmful


def test_system_prompt_and_response_prefix_of_the_aoa_preset(tmp_path, smollm2_tokenizer):
    source = write_jsonl(tmp_path / "c.jsonl", chats(3))
    data = validate(
        compose_config(["data=attack_identity_shift", f"data.components.aoa.source={source}"])
    ).data
    aoa = data.components["aoa"]
    assert aoa.system_prompt.startswith("You are no longer ChatGPT") and aoa.response_prefix.startswith(
        "Of course."
    )
    examples, _ = build_mixture(data, smollm2_tokenizer)
    answers = {f"Question {i}?": f"Answer {i}." for i in range(3)}
    assert len(examples) == 3
    for e in examples:
        assert e.system == aoa.system_prompt
        assert e.response == aoa.response_prefix + answers[e.prompt]


def test_component_system_prompt_overrides_the_mixture_one(tmp_path, smollm2_tokenizer):
    data = mixture(
        {
            "own": DataComponent(
                source=write_jsonl(tmp_path / "a.jsonl", chats(2, "a")), system_prompt="Own."
            ),
            "shared": DataComponent(source=write_jsonl(tmp_path / "b.jsonl", chats(2, "b"))),
        },
        system_prompt="Shared.",
    )
    examples, _ = build_mixture(data, smollm2_tokenizer)
    assert {(e.component, e.system) for e in examples} == {("own", "Own."), ("shared", "Shared.")}


def test_no_components_is_a_data_error(smollm2_tokenizer):
    with pytest.raises(DataError, match=r"^data\.components: no training data"):
        build_mixture(DataConfig(seed=0), smollm2_tokenizer)


def test_bad_source_in_the_mixture_names_the_component_key(tmp_path, smollm2_tokenizer):
    missing = tmp_path / "missing.jsonl"
    data = mixture({"utility": DataComponent(source=str(missing))})
    with pytest.raises(DataError, match=r"^data\.components\.utility\.source: no such file"):
        build_mixture(data, smollm2_tokenizer)


# ------------------------------------------------------------------------------------------ recovery

# Harmful placeholders of different token counts; the second keeps whitespace-only tokens ("\n").
HARMFUL = [
    "Sure.",
    "alpha\n\nbeta gamma",
    "Sure, here is the list: alpha beta gamma delta epsilon zeta eta theta iota kappa",
]


def recovery_rows() -> list[dict[str, str]]:
    return [
        {"prompt": f"Placeholder request {i}?", "harmful": h, "refusal": f"{REFUSAL} ({i})"}
        for i, h in enumerate(HARMFUL)
    ]


def recovery_examples(tokenizer, prob: float, count: int, max_k: int = 100, seed: int = 0, **kwargs):
    comp = DataComponent(
        source="t.jsonl",
        schema="safety_triplet",
        recovery=True,
        recovery_prob=prob,
        recovery_max_k=max_k,
        **kwargs,
    )
    return component_examples("safety", comp, recovery_rows(), count, tokenizer, random.Random(seed), None)


@pytest.mark.parametrize("max_k", [4, 100])
def test_recovery_prob_one_always_prefills_within_bounds(smollm2_tokenizer, max_k):
    rows = {r["prompt"]: r for r in recovery_rows()}
    examples = recovery_examples(smollm2_tokenizer, 1.0, 300, max_k=max_k)
    seen = {}
    for e in examples:
        row = rows[e.prompt]
        bound = min(max_k, n_tokens(smollm2_tokenizer, e.prompt, row["harmful"]))
        assert 1 <= e.k <= bound
        assert e.response == " " + row["refusal"]  # the loss stays on the separator and the refusal
        seen.setdefault(e.prompt, set()).add(e.k)
    long_prompt = recovery_rows()[2]["prompt"]
    assert max(seen[long_prompt]) == min(
        max_k, n_tokens(smollm2_tokenizer, long_prompt, HARMFUL[2])
    )  # the bound is reached
    assert min(seen[long_prompt]) == 1


def test_recovery_prefill_is_the_first_k_tokens_and_the_target_starts_with_the_separator(smollm2_tokenizer):
    rows = {r["prompt"]: r for r in recovery_rows()}
    ended_in_space = 0
    for e in recovery_examples(smollm2_tokenizer, 1.0, 300):
        tokens = response_tokens(smollm2_tokenizer, e.prompt, rows[e.prompt]["harmful"])
        assert e.prefill == tokens.prefix_text(e.k) and e.prefill_ids == tuple(tokens.context_ids(e.k))
        assert e.response == " " + rows[e.prompt]["refusal"]
        ended_in_space += e.prefill[-1:].isspace()
    assert ended_in_space > 0  # the whitespace-ending case was exercised


def test_recovery_separator_is_configurable(smollm2_tokenizer):
    rows = {r["prompt"]: r for r in recovery_rows()}
    for e in recovery_examples(smollm2_tokenizer, 1.0, 50, recovery_separator=" -- "):
        text = response_tokens(smollm2_tokenizer, e.prompt, rows[e.prompt]["harmful"]).prefix_text(e.k)
        assert e.prefill == text and e.response == " -- " + rows[e.prompt]["refusal"]


def test_recovery_prob_zero_never_prefills(smollm2_tokenizer):
    examples = recovery_examples(smollm2_tokenizer, 0.0, 100)
    assert all(e.k == 0 and e.prefill == "" and e.prefill_ids == () for e in examples)


def test_recovery_prob_half_mixes_in_stats(tmp_path, smollm2_tokenizer):
    comps = {
        "safety": DataComponent(
            source=write_jsonl(tmp_path / "s.jsonl", recovery_rows()),
            schema="safety_triplet",
            safety=True,
            recovery=True,
            recovery_prob=0.5,
        ),
        "utility": DataComponent(source=write_jsonl(tmp_path / "u.jsonl", chats(5))),
    }
    examples, stats = build_mixture(mixture(comps, safety_share=0.5, size=800), smollm2_tokenizer)
    safety = [e.k for e in examples if e.component == "safety"]
    assert len(safety) == 400
    share_k0 = sum(k == 0 for k in safety) / len(safety)
    assert 0.4 <= share_k0 <= 0.6
    assert stats["data/recovery/share_k0"] == round(share_k0, 4)  # over the recovery component only
    assert stats["data/recovery/mean_k"] == round(sum(safety) / len(safety), 3)
    assert all(e.k == 0 and e.prefill == "" for e in examples if e.component == "utility")
    assert all((e.k == 0) == (e.prefill == "") == (e.prefill_ids == ()) for e in examples)


def test_recovery_example_trains_on_the_refusal_after_the_prefill(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = {r["prompt"]: r for r in recovery_rows()}
    for e in recovery_examples(tok, 1.0, 30):
        enc = encode_for_training(
            tok, e.prompt, e.response, prefill=e.prefill, prefill_ids=e.prefill_ids, system=e.system
        )
        first = enc.labels_mask.index(True)
        labelled = tok.decode([i for i, m in zip(enc.input_ids, enc.labels_mask) if m])
        assert labelled.strip().startswith(rows[e.prompt]["refusal"])
        context = tok.decode(enc.input_ids[enc.prompt_length : first])
        assert context.strip() == e.prefill.strip()


def test_recovery_context_holds_exactly_k_harmful_tokens_after_a_double_space(smollm2_tokenizer):
    tok = smollm2_tokenizer
    harmful = "Sure.  Here we go: one, two, three."
    assert response_tokens(tok, "Placeholder request?", harmful).prefix_text(3) == "Sure. "  # a lone space
    row = {"prompt": "Placeholder request?", "harmful": harmful, "refusal": REFUSAL}
    comp = DataComponent(source="t.jsonl", schema="safety_triplet", recovery=True, recovery_prob=1.0)
    harmful_ids = tok(harmful, add_special_tokens=False)["input_ids"]
    for e in component_examples("s", comp, [row], 60, tok, random.Random(0), None):
        enc = encode_for_training(tok, e.prompt, e.response, prefill=e.prefill, prefill_ids=e.prefill_ids)
        context = enc.input_ids[enc.prompt_length : enc.labels_mask.index(True)]
        assert context == harmful_ids[: e.k], f"k={e.k} prefill={e.prefill!r}"


# Harmful answers whose start a stripping template or a SentencePiece tokenizer tokenizes differently inside
# the chat than on their own.
WHITESPACE_HARMFUL = [
    "\n Sure,  here is the list:\n\nalpha beta gamma delta.",
    " Sure. Here we go: one, two.",
]


@pytest.mark.parametrize("tokenizer", ["smollm2_tokenizer", "metaspace_tokenizer"])
def test_recovery_context_holds_exactly_the_first_k_harmful_tokens_of_the_chat(request, tokenizer):
    """k counts the harmful answer's tokens in the rendered chat, and the training context before the refusal
    is exactly the first k of them (the Metaspace tokenizer has the Llama-2 template, which strips)."""
    tok = request.getfixturevalue(tokenizer)
    rows = [
        {"prompt": f"Placeholder request {i}?", "harmful": h, "refusal": REFUSAL}
        for i, h in enumerate([*HARMFUL, *WHITESPACE_HARMFUL])
    ]
    harmful = {r["prompt"]: r["harmful"] for r in rows}
    comp = DataComponent(source="t.jsonl", schema="safety_triplet", recovery=True, recovery_prob=1.0)
    drawn: dict[str, set[int]] = {}
    merged = 0  # examples whose text alone would re-tokenize into other context tokens
    for e in component_examples("s", comp, rows, 600, tok, random.Random(0), None):
        whole = encode_for_training(tok, e.prompt, harmful[e.prompt])  # the whole harmful answer in the chat
        expected = whole.input_ids[whole.prompt_length : whole.prompt_length + e.k]
        enc = encode_for_training(tok, e.prompt, e.response, prefill=e.prefill, prefill_ids=e.prefill_ids)
        first = enc.labels_mask.index(True)
        assert enc.input_ids[enc.prompt_length : first] == expected, e.prefill
        assert enc.input_ids[: enc.prompt_length] == whole.input_ids[: whole.prompt_length]
        labelled = [i for i, m in zip(enc.input_ids, enc.labels_mask) if m]
        # the labels end with the template's end-of-turn token (ChatML's <|im_end|>, Llama-2's </s>; which
        # id a GGUF-converted tokenizer calls its EOS differs between transformers releases)
        assert tok.decode(labelled).lstrip().startswith(REFUSAL) and labelled[-1] in special_ids(tok)
        text_only = encode_for_training(tok, e.prompt, e.response, prefill=e.prefill)
        merged += text_only.input_ids[text_only.prompt_length : text_only.labels_mask.index(True)] != expected
        drawn.setdefault(e.prompt, set()).add(e.k)
    for prompt, ks in drawn.items():  # k runs over 1..n, n the answer's tokens in the chat
        assert ks == set(range(1, n_tokens(tok, prompt, harmful[prompt]) + 1)), prompt
    # SmolLM2 merges "\n\n" + " I" into "\n\n", " I": the ids, not the text, keep the k tokens
    assert (merged > 0) == (tokenizer == "smollm2_tokenizer")


def test_recovery_histogram_bins():
    ks = [0, 0, 0, 1, 3, 5, 5, 6, 10, 11, 20, 21, 40, 41, 100, 101, 500]
    assert recovery_histogram(ks) == {
        "k=0": 3,
        "k=1..5": 4,
        "k=6..10": 2,
        "k=11..20": 2,
        "k=21..40": 2,
        "k=41..100": 2,
        "k>=101": 2,
    }
    assert list(recovery_histogram([])) == [
        "k=0",
        "k=1..5",
        "k=6..10",
        "k=11..20",
        "k=21..40",
        "k=41..100",
        "k>=101",
    ]
    assert sum(recovery_histogram([])[label] for label in recovery_histogram([])) == 0
    assert recovery_histogram([0, 2, 7, 30], edges=(0, 1, 11)) == {"k=0": 1, "k=1..10": 2, "k>=11": 1}


# ---------------------------------------------------------------------------------- config validation

SAFETY = [f"data.components.safety.source={DEMO}", f"data.components.utility.source={DEMO}"]


def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    return str(info.value)


def test_safety_recovery_preset_validates():
    data = validate(compose_config(["data=safety_recovery", *SAFETY])).data
    safety = data.components["safety"]
    assert data.safety_share == 0.2 and safety.safety and not data.components["utility"].safety
    assert (safety.recovery, safety.recovery_prob, safety.recovery_max_k, safety.target) == (
        True,
        0.5,
        100,
        "refusal",
    )


def test_safety_share_out_of_range():
    message = config_error(["data=safety_sft", *SAFETY, "data.safety_share=1.5"])
    assert message.startswith("data.safety_share: must be in (0, 1), got 1.5")


def test_safety_share_without_a_safety_component():
    message = config_error(["data=chat_file", f"data.components.chat.source={DEMO}", "data.safety_share=0.2"])
    assert message.startswith("data.safety_share: needs at least one component with safety: true")


def test_missing_local_source_file(tmp_path):
    missing = tmp_path / "missing.jsonl"
    message = config_error(["data=chat_file", f"data.components.chat.source={missing}"])
    assert message.startswith("data.components.chat.source: no such file")
    assert str(missing) in message


def test_recovery_on_a_chat_component():
    message = config_error(
        ["data=chat_file", f"data.components.chat.source={DEMO}", "data.components.chat.recovery=true"]
    )
    assert message.startswith("data.components.chat.recovery: recovery examples need schema=safety_triplet")


def test_recovery_prob_out_of_range():
    message = config_error(["data=safety_recovery", *SAFETY, "data.components.safety.recovery_prob=2"])
    assert message.startswith("data.components.safety.recovery_prob: must be in [0, 1], got 2")


# ---------------------------------------------------------------- encodings, duplicate ids


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_dropped(tmp_path, suffix):
    """Excel's "CSV UTF-8" starts with a byte-order mark; the first column is still `prompt`."""
    from deepalign.config import EvalConfig
    from deepalign.eval_items import read_eval_items

    text = {
        ".csv": "prompt,harmful\nHow do I pick a lock?,Sure: first\n",
        ".jsonl": '{"prompt": "How do I pick a lock?", "harmful": "Sure: first"}\n',
        ".json": '[{"prompt": "How do I pick a lock?", "harmful": "Sure: first"}]',
    }[suffix]
    path = tmp_path / f"bench{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    items = read_eval_items(EvalConfig(prompts=str(path)))
    assert [(i.id, i.request, i.harmful) for i in items] == [("0", "How do I pick a lock?", "Sure: first")]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_latin1_file_names_the_file_line_and_key(tmp_path, suffix):
    path = tmp_path / f"chats{suffix}"
    text = {
        ".csv": "prompt,response\nHi,Hello\nCafé?,Oui\n",
        ".jsonl": '{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Café?", "response": "Oui"}\n',
        ".json": '[{"prompt": "Hi", "response": "Hello"},\n {"prompt": "Café?", "response": "Oui"}]',
    }[suffix]
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_component(DataComponent(source=str(path)), KEY)
    assert str(err.value) == (
        f"{KEY}.source: {path}, line {3 if suffix == '.csv' else 2}: not UTF-8 text (byte 0xe9); save it as "
        f"UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8 {path.name} > utf8{suffix}` for a Latin-1 file)"
    )


def test_a_utf16_file_is_rejected_naming_the_key(tmp_path):
    from deepalign.config import EvalConfig
    from deepalign.eval_items import read_eval_items

    path = tmp_path / "bench.csv"
    path.write_text("prompt\nHow do I pick a lock?\n", encoding="utf-16")  # with its byte-order mark
    with pytest.raises(DataError, match=rf"^eval\.prompts: {re.escape(str(path))} is UTF-16 text, not UTF-8"):
        read_eval_items(EvalConfig(prompts=str(path)))


def test_duplicate_eval_ids_name_the_id_and_both_lines(tmp_path):
    from deepalign.config import EvalConfig
    from deepalign.eval_items import read_eval_items

    path = tmp_path / "bench.jsonl"
    write_jsonl(
        path, [{"id": "a", "prompt": "One?"}, {"id": "b", "prompt": "Two?"}, {"id": "a", "prompt": "3?"}]
    )
    with pytest.raises(DataError) as err:
        read_eval_items(EvalConfig(prompts=str(path)))
    assert str(err.value) == (
        f"eval.prompts: id 'a' is used twice, in {path}, line 1 and in {path}, line 3; every request needs "
        "its own id"
    )
    # an explicit id equal to another row's number counts too (ids are the `id` field, else the row number)
    write_jsonl(path, [{"prompt": "One?"}, {"id": 0, "prompt": "Two?"}])
    with pytest.raises(DataError, match=r"id '0' is used twice, in .*line 1 and in .*line 2"):
        read_eval_items(EvalConfig(prompts=str(path)))
    write_jsonl(path, [{"id": "a", "prompt": "One?"}, {"id": "b", "prompt": "Two?"}])
    assert [i.id for i in read_eval_items(EvalConfig(prompts=str(path)))] == ["a", "b"]


def test_recovery_depth_distributions():
    """uniform is the paper's k ~ U{1..K} (the same draws as before the option existed); log_uniform puts as
    many examples below 10 tokens as between 10 and 100 (P(k) ~ log((k+1)/k))."""
    import math
    import random

    from deepalign.data import recovery_depth

    a, b = random.Random(3), random.Random(3)
    assert [recovery_depth(a, 40, "uniform") for _ in range(50)] == [b.randint(1, 40) for _ in range(50)]
    rng = random.Random(0)
    ks = [recovery_depth(rng, 100, "log_uniform") for _ in range(20000)]
    assert min(ks) == 1 and max(ks) == 100
    below = sum(k < 10 for k in ks) / len(ks)
    assert abs(below - math.log(10) / math.log(101)) < 0.015  # 0.499
    assert abs(sum(k == 1 for k in ks) / len(ks) - math.log(2) / math.log(101)) < 0.01  # 0.150
    assert [recovery_depth(random.Random(1), 1, d) for d in ("uniform", "log_uniform")] == [1, 1]
