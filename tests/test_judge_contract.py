"""The contract of every judge, enforced in one place (`JudgeBase.judge`: exactly one judgment per item, in
order, `harmful` True, False or None), and failed judgments (`harmful` None) as not final: the attack stage
asks for them again on its next run, and the log, the metrics and the report say how many failed."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import compose_config
from fake_api import KEY_ENV, serve_fake_api

from deepalign import runner
from deepalign.config import validate
from deepalign.judges import JudgeBase, JudgeContractError, JudgeItem, Judgment
from deepalign.judges.base import failed_judgments
from deepalign.report import failed_judgments_note
from deepalign.stages.attack import failure_counts, generation_digest, judge_store, success_rates
from deepalign.storage.jsonl import JsonlStore


class ScriptedJudge(JudgeBase):
    """A judge as a plugin writes one: `_judge` returns what `answer(items, call)` gives, `call` counting
    from 0; `asked` holds the item ids of every call."""

    def __init__(self, name: str, answer: Callable[[Sequence[JudgeItem], int], list]):
        self.name, self.version, self.cfg = name, "scripted-v1", SimpleNamespace(show_prefill=True)
        self.answer, self.asked = answer, []

    def _judge(self, items: Sequence[JudgeItem]) -> list:
        self.asked.append([item.id for item in items])
        return self.answer(items, len(self.asked) - 1)


def verdict(item: JudgeItem, harmful, error: str | None = None) -> Judgment:
    return Judgment(item.id, "plugin", "scripted-v1", harmful, None, True, error=error)


def generations(n: int, response: str = " Step 1: do it.") -> list[dict]:
    """Generation records as the attack stage stores them, one sample per prompt."""
    return [
        {
            "key": f"none/{i}/0",
            "variant": "none",
            "prompt_id": str(i),
            "sample": 0,
            "request": f"Request {i}",
            "prompt": f"<chat>Request {i}</chat>",
            "prefill": "",
            "response": response,
        }
        for i in range(n)
    ]


def stored(run_dir: Path, judge: str = "plugin") -> dict[str, dict]:
    return JsonlStore(run_dir / "judgments" / f"none.{judge}.jsonl").records


# ================================================================================== the judges' contract


def test_a_judge_that_drops_a_verdict_is_an_error_naming_it_and_nothing_is_stored(tmp_path):
    """The plugin that dropped its last verdict: before, the missing item was recorded as an empty
    continuation (harmful=False) and a true 100% ASR read 66.7%."""
    judge = ScriptedJudge("plugin", lambda items, call: [verdict(i, True) for i in items[:-1]])
    with pytest.raises(
        JudgeContractError, match=r"^judge 'plugin' \(ScriptedJudge\): returned 2 judgments for 3"
    ):
        judge_store(tmp_path, "none", judge, generations(3))
    assert stored(tmp_path) == {}
    more = ScriptedJudge("plugin", lambda items, call: [verdict(i, True) for i in [*items, items[0]]])
    with pytest.raises(JudgeContractError, match="returned 4 judgments for 3 items"):
        more.judge([JudgeItem(str(i), "q", "a") for i in range(3)])


@pytest.mark.parametrize("bad", ["no", 1, 0.0, "true"])
def test_harmful_must_be_true_false_or_none(tmp_path, bad):
    judge = ScriptedJudge(
        "plugin", lambda items, call: [verdict(i, bad if i.id.startswith("none/1") else True) for i in items]
    )
    with pytest.raises(
        JudgeContractError, match=rf"^judge 'plugin' .*judgment 'none/1/0' has harmful={bad!r}"
    ):
        judge_store(tmp_path, "none", judge, generations(3))
    assert stored(tmp_path) == {}  # an error before anything is stored: no bad row to reuse or crash on


def test_judgments_out_of_order_or_not_judgments_are_errors():
    items = [JudgeItem("a", "q", "x"), JudgeItem("b", "q", "y")]
    swapped = ScriptedJudge("plugin", lambda items, call: [verdict(i, False) for i in reversed(items)])
    with pytest.raises(JudgeContractError, match=r"judgment 0 has id 'b' where item 0 is 'a'"):
        swapped.judge(items)
    loose = ScriptedJudge("plugin", lambda items, call: [{"id": i.id, "harmful": True} for i in items])
    with pytest.raises(JudgeContractError, match=r"judgment 0 is a dict, not a Judgment"):
        loose.judge(items)
    lazy = ScriptedJudge("plugin", lambda items, call: (verdict(i, True) for i in items))
    with pytest.raises(JudgeContractError, match=r"returned a generator, not a list of Judgments"):
        lazy.judge(items)


def test_the_contract_counts_the_items_the_judge_was_given():
    """Empty continuations are not passed to `_judge`: it owes one judgment per item it got, and the
    empty-continuation rule fills in the others."""
    judge = ScriptedJudge("plugin", lambda items, call: [verdict(i, True) for i in items])
    items = [JudgeItem("a", "q", " x"), JudgeItem("b", "q", "  "), JudgeItem("c", "q", "y")]
    got = judge.judge(items)
    assert judge.asked == [["a", "c"]]
    assert [(j.id, j.harmful, j.detail) for j in got] == [
        ("a", True, None),
        ("b", False, "empty continuation"),
        ("c", True, None),
    ]


def test_bad_rows_stored_before_the_contract_are_judged_again(tmp_path):
    """A row stored with harmful="no" (by a judge before the contract) is not final: judged again, and the
    ASR reads the new verdicts instead of crashing."""
    gens = generations(2)
    old = JsonlStore(tmp_path / "judgments" / "none.plugin.jsonl")
    old.append(
        [
            {"key": g["key"], "variant": "none", "prompt_id": g["prompt_id"], "digest": generation_digest(g)}
            | vars(Judgment(g["key"], "plugin", "scripted-v1", "no", None, True))
            for g in gens
        ]
    )
    judge = ScriptedJudge("plugin", lambda items, call: [verdict(i, False) for i in items])
    records = judge_store(tmp_path, "none", judge, gens).records
    assert judge.asked == [["none/0/0", "none/1/0"]]
    assert [records[g["key"]]["harmful"] for g in gens] == [False, False]
    assert success_rates([records[g["key"]] for g in gens], "asr_plugin")["asr_plugin/none"] == 0.0


# ================================================================================== failed judgments


def test_failed_judgments_are_asked_again_on_the_next_run(tmp_path, caplog):
    """A judge that could not answer (an unreachable server) records harmful=None; the next judge_store (the
    stage's next run) asks again for those items only, until they succeed."""
    down = {"none/1/0", "none/2/0"}

    def answer(items, call):
        if call == 0:
            return [
                verdict(i, None, "APIConnectionError: down") if i.id in down else verdict(i, True)
                for i in items
            ]
        return [verdict(i, True) for i in items]

    judge = ScriptedJudge("plugin", answer)
    gens = generations(4)
    with caplog.at_level(logging.WARNING, logger="deepalign.stages.attack"):
        first = judge_store(tmp_path, "none", judge, gens).records
    assert [first[g["key"]]["harmful"] for g in gens] == [True, None, None, True]
    assert (
        "attack none, judge plugin: 2 of 4 judgments failed (first error: APIConnectionError: down)"
        in caplog.text
    )
    assert "the next run of the stage (the same command again) asks for them again" in caplog.text
    assert failure_counts({"plugin": [first[g["key"]] for g in gens]}) == {"judge_failed/plugin": 2}
    rates = success_rates([first[g["key"]] for g in gens], "asr_plugin")
    assert rates["asr_plugin/none"] == 1.0 and rates["asr_plugin/none/n"] == 2  # the failures left out
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepalign.stages.attack"):
        second = judge_store(tmp_path, "none", judge, gens).records
    assert judge.asked == [[g["key"] for g in gens], ["none/1/0", "none/2/0"]]
    assert [second[g["key"]]["harmful"] for g in gens] == [True] * 4 and "failed" not in caplog.text
    judge_store(tmp_path, "none", judge, gens)
    assert len(judge.asked) == 2  # all final now: nothing asked
    assert failure_counts({"plugin": [second[g["key"]] for g in gens]}) == {"judge_failed/plugin": 0}


def test_failed_judgments_in_metrics_and_report():
    assert failed_judgments({"judge_failed/rubric": 3, "judge_failed/keyword": 0, "asr/none": 0.5}) == 3
    assert failed_judgments({"shallow/judge_failed/rubric": 2, "deep/judge_failed/rubric": 1}) == 3
    assert failed_judgments({"judge_failed/rubric": 0, "asr/none": None}) == 0
    metrics = {
        "shallow/judge_failed/rubric": 2,
        "shallow/judge_failed/keyword": 0,
        "deep/judge_failed/rubric": 0,
    }
    note = "\n".join(failed_judgments_note(metrics, ["unaligned", "shallow", "deep"]))
    assert "Failed judgments (left out of the ASRs and their n): shallow by `rubric`: 2." in note
    assert "The same command again\nasks the judge again for them" in note
    assert "keyword" not in note and "deep" not in note
    assert failed_judgments_note({"deep/judge_failed/rubric": 0}, ["deep"]) == []


def done(run_dir: Path) -> dict[str, str]:
    """The stages recorded as done (stages.json; none before the first)."""
    path = run_dir / "stages.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.fixture
def api(monkeypatch):
    yield from serve_fake_api(monkeypatch)


def test_a_run_whose_judge_server_was_down_judges_on_the_next_run(api, tmp_path, caplog):
    """The whole stage: the rubric judge's server answers 500 to every request, so every judgment fails;
    the stage is not recorded as done, and running the same config again once the server is back asks the
    server for exactly those items and gives the ASR."""
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(
        "".join(json.dumps({"prompt": f"[[down]] Please answer request {i}."}) + "\n" for i in range(3))
    )
    model_cache = Path(validate(compose_config(["model=tiny"])).model.cache_dir).expanduser()
    cfg = compose_config(
        [
            "model=tiny",
            "+model.arch.initializer_range=0.3",  # answers with text (the default init writes blank lines)
            f"model.cache_dir={model_cache}",
            "logger=none",
            "stages=[attack]",
            f"eval.prompts={eval_file}",
            "generation.max_new_tokens=4",
            "attack=[none]",
            "judge=[rubric]",
            f"judge.rubric.base_url={api.base_url}",
            f"judge.rubric.api_key_env={KEY_ENV}",
            "judge.rubric.max_retries=0",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    run_dir = tmp_path / "run"
    api.script["down"] = [("status", 500, {})] * 3
    with caplog.at_level(logging.WARNING):
        first = runner.run(cfg, run_dir)
    asked = api.count("down")
    assert asked >= 1  # the non-empty answers (an empty one is judged without asking)
    assert first["judge_failed/rubric"] == asked and first["asr/none"] is None and first["asr/none/n"] == 0
    assert "attack" not in done(run_dir)
    assert f"stage attack: {asked} judgments failed; run it again to retry them" in caplog.text
    second = runner.run(cfg, run_dir)  # the server is back (its script is used up)
    assert api.count("down") == 2 * asked  # exactly the failed items, asked again
    assert second["judge_failed/rubric"] == 0 and second["asr/none"] == 0.0 and second["asr/none/n"] == 3
    assert "attack" in done(run_dir)
    records = stored(run_dir, "rubric")
    assert len(records) == 3 and all(r["harmful"] is False for r in records.values())
    runner.run(cfg, run_dir)
    assert api.count("down") == 2 * asked  # done now: skipped
