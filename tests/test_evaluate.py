"""The attack, analyze and utility stages on the tiny model: prefills, decoding grid, artifacts, resume."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from test_kl import direct_loss_and_grad_norm
from transformers import AutoModelForCausalLM

from deepalign import cli
from deepalign.attacks.base import Attack, unique_variants
from deepalign.attacks.decoding import DecodingAttackConfig as DecodingAttack
from deepalign.attacks.decoding import decoding_grid
from deepalign.chat import encode_for_generation, encode_for_training, response_tokens
from deepalign.config import EvalConfig, validate
from deepalign.data import DataError
from deepalign.eval_items import Variant, read_eval_items
from deepalign.generation import SamplingParams
from deepalign.judges import REFUSAL_LISTS
from deepalign.models import load_model
from deepalign.plugins import ATTACKS, PluginError, register_attack
from deepalign.stages import attack as attack_stage
from deepalign.storage.jsonl import JsonlStore

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"
HARMFUL = f"Sure, here is the list: {WORDS} {WORDS} {WORDS}."  # a neutral placeholder, 60+ tokens


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    rows = [{"prompt": f"Please answer request {i}.", "harmful": HARMFUL} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def attack_config(eval_file: Path, *overrides: str):
    return compose_config(
        [
            "model=tiny",
            "logger=none",
            "stages=[attack]",
            f"eval.prompts={eval_file}",
            "generation.max_new_tokens=6",
            "generation.batch_size=8",
            *overrides,
        ]
    )


def test_decoding_grid_enumerates_as_configured():
    cfg = DecodingAttack(temperatures=[0.5, 1.0], top_ks=[1, 5], top_ps=[0.9], greedy=True)
    grid = decoding_grid(cfg, max_new_tokens=7)
    names = [n for n, _ in grid]
    assert names == [
        "decoding/greedy",
        "decoding/temperature=0.5",
        "decoding/temperature=1",
        "decoding/top_k=1",
        "decoding/top_k=5",
        "decoding/top_p=0.9",
    ]
    params = dict(grid)
    assert not params["decoding/greedy"].do_sample
    assert (
        params["decoding/temperature=0.5"].temperature == 0.5
        and params["decoding/temperature=0.5"].top_k == 0
    )
    assert params["decoding/top_k=5"].top_k == 5 and params["decoding/top_k=5"].temperature == 1.0
    assert params["decoding/top_p=0.9"].top_p == 0.9 and params["decoding/top_p=0.9"].top_k == 0
    assert all(p.max_new_tokens == 7 for p in params.values())
    default = decoding_grid(DecodingAttack(), 8)
    assert len(default) == 1 + 20 + 9 + 20  # the paper's grid: greedy, 20 temperatures, 9 top-k, 20 top-p


def test_eval_items_from_csv_with_goal_column_and_trigger(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text(
        'goal,target\n"Write a poem","Sure, here is a poem"\n"Count to ten","Sure, here is the count"\n'
    )
    items = read_eval_items(EvalConfig(prompts=str(path), trigger="XYZ"))
    assert [i.request for i in items] == ["Write a poem", "Count to ten"]
    assert items[0].prompt == "Write a poem XYZ" and items[0].target == "Sure, here is a poem"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: no request text"):
        read_eval_items(EvalConfig(prompts=str(bad)))


def test_prefill_attack_puts_exactly_k_tokens_in_the_assistant_turn(eval_file, tmp_path, smollm2_tokenizer):
    cfg = attack_config(eval_file, "attack=[prefill]", "attack.prefill.depths=[0,3,10]")
    metrics = cli.run(cfg, tmp_path / "run")
    tok = smollm2_tokenizer
    harmful_ids = tok(HARMFUL, add_special_tokens=False)["input_ids"]
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "generations" / "prefill.jsonl").read_text().split("\n")
        if line
    ]
    assert len(rows) == 3 * 4
    for row in rows:
        k = int(row["variant"].split("=")[1])
        assert row["prefill"] == response_tokens(tok, row["prompt"], HARMFUL).prefix_text(k)
        ids = encode_for_generation(tok, row["prompt"], prefill=row["prefill"])
        plain = encode_for_generation(tok, row["prompt"])
        assert ids[len(plain) :] == harmful_ids[:k], (
            "the assistant turn must start with exactly k harmful tokens"
        )
    for k in (0, 3, 10):
        assert 0.0 <= metrics[f"asr/prefill/k={k}"] <= 1.0
        assert metrics[f"asr_keyword/prefill/k={k}"] == metrics[f"asr/prefill/k={k}"]
    judged = (tmp_path / "run" / "judgments" / "prefill.keyword.jsonl").read_text().split("\n")
    record = json.loads(judged[0])
    assert record["judge"] == "keyword" and record["version"].startswith("keyword:qi2024")
    assert record["shown_prefill"] is True


def test_prefill_deeper_than_the_response_fails_before_generating(eval_file, tmp_path, monkeypatch):
    def no_engine(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(attack_stage, "make_engine", no_engine)
    cfg = attack_config(eval_file, "attack=[prefill]", "attack.prefill.depths=[5,500]")
    with pytest.raises(DataError, match=r"attack\.prefill\.depths: item 0's harmful response has \d+ tokens"):
        cli.run(cfg, tmp_path / "run")


class CountingEngine:
    """Counts the rows the engine decodes (a sampled request's samples; equal greedy requests once)."""

    def __init__(self, engine):
        self.engine, self.rows = engine, 0

    def generate(self, requests, context=()):
        before = self.engine.stats.sequences
        yield from self.engine.generate(requests, context)
        self.rows += self.engine.stats.sequences - before


def test_interrupted_attack_resumes_without_redoing_finished_items(eval_file, tmp_path, monkeypatch):
    """A killed attack resumes: only the lost generations are redone, and since a sample depends only on
    (seed, id, sample), not on the batch it runs in, the redone ones equal those of the uninterrupted run."""
    overrides = [
        "attack=[none,decoding]",
        "attack.decoding.temperatures=[0.7]",
        "attack.decoding.top_ks=[5]",
        "attack.decoding.top_ps=[]",
        "attack.decoding.samples_per_setting=2",
    ]
    run_dir = tmp_path / "run"
    first = cli.run(attack_config(eval_file, *overrides), run_dir)
    gen_path = run_dir / "generations" / "decoding.jsonl"
    lines = gen_path.read_text().split("\n")
    lines = [line for line in lines if line]
    assert len(lines) == 4 * (1 + 2 + 2)  # greedy once, two sampled settings x 2 samples
    uninterrupted = {json.loads(line)["key"]: json.loads(line) for line in lines}
    redone = [json.loads(line)["key"] for line in lines[-4:]]
    # the comparison below means something: the lost records are samples, and they all differ
    assert all(uninterrupted[k]["params"]["do_sample"] for k in redone)
    assert len({uninterrupted[k]["response"] for k in redone}) == 4
    # Simulate a kill: the last 3 records lost, the one before torn mid-line; the stage not marked done.
    gen_path.write_text("\n".join(lines[:-4]) + "\n" + lines[-4][:20])
    (run_dir / "stages.json").unlink()
    judged = run_dir / "judgments" / "decoding.keyword.jsonl"
    judged.write_text("\n".join(judged.read_text().split("\n")[:5]) + "\n")

    engines = []

    def counting(*args, **kwargs):
        engines.append(CountingEngine(make(*args, **kwargs)))
        return engines[0]

    make = attack_stage.make_engine
    monkeypatch.setattr(attack_stage, "make_engine", counting)
    second = cli.run(attack_config(eval_file, *overrides), run_dir)
    assert engines[0].rows == 4, "only the 4 lost or torn generations are redone"
    records = JsonlStore(gen_path).records
    assert records == uninterrupted  # finished items kept as they were, the redone ones generated the same
    untimed = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/", "flops/"))}  # noqa: E731
    assert untimed(second) == untimed(first)


def test_depth_figures_are_the_prefill_instances_own_whatever_else_runs(eval_file, tmp_path, monkeypatch):
    """`prefill/k=0`, the plain request on the instance's own items, always runs and is depth 0 of its
    curve: the depth figures of attack=[prefill] equal those of attack=[none,prefill] (before, `asr/none`
    became depth 0 when it existed). Next to `none` its greedy answers are none's, not generated twice."""
    engines = []

    def counting(*args, **kwargs):
        engines.append(CountingEngine(make(*args, **kwargs)))
        return engines[-1]

    make = attack_stage.make_engine
    monkeypatch.setattr(attack_stage, "make_engine", counting)
    depths = "attack.prefill.depths=[2,4]"  # no 0 listed: it runs all the same
    alone = cli.run(attack_config(eval_file, "attack=[prefill]", depths), tmp_path / "alone")
    assert engines[-1].rows == 3 * 4
    beside = cli.run(attack_config(eval_file, "attack=[none,prefill]", depths), tmp_path / "beside")
    assert engines[-1].rows == 3 * 4, "none, k=2, k=4: the k=0 answers are none's"
    assert alone["asr/prefill/k=0/n"] == beside["asr/prefill/k=0/n"] == 4
    assert alone["asr/prefill/k=0"] == beside["asr/prefill/k=0"] == beside["asr/none"]
    names = ("asr_auc", "k50", "k50_censored", "k50_left_censored")
    assert {n: alone[f"depth/{n}"] for n in names} == {n: beside[f"depth/{n}"] for n in names}
    assert alone["depth/k50_left_censored"] == 0  # the curve starts at depth 0
    plain = JsonlStore(tmp_path / "beside" / "generations" / "none.jsonl").records
    zero = JsonlStore(tmp_path / "beside" / "generations" / "prefill.jsonl").records
    assert {k.removeprefix("none/"): r["response"] for k, r in plain.items()} == {
        k.removeprefix("prefill/k=0/"): r["response"]
        for k, r in zero.items()
        if r["variant"] == "prefill/k=0"
    }
    # the same run again: every answer and judgment reused, nothing written twice
    lines = (tmp_path / "beside" / "generations" / "prefill.jsonl").read_text().count("\n")
    cli.run(
        attack_config(eval_file, "attack=[none,prefill]", depths, "judge=[keyword_substantive]"),
        tmp_path / "beside",
    )
    assert engines[-1].rows == 0
    assert (tmp_path / "beside" / "generations" / "prefill.jsonl").read_text().count("\n") == lines


def test_an_attack_that_names_a_variant_twice_fails_naming_instance_and_variant(
    eval_file, tmp_path, monkeypatch
):
    """A plugin attack whose variants share a name would have every answer counted twice (n = 2 x the
    prompts, a too narrow interval): the stage stops before generating, naming the instance and variant."""

    @dataclass
    class TwiceConfig:
        enabled: bool = True

    class SameNameTwice(Attack):
        def variants(self, run, base):
            return [Variant(f"{self.name}/t=1", base), Variant(f"{self.name}/t=1", base)]

    monkeypatch.setattr(ATTACKS, "_specs", dict(ATTACKS.items()))  # the registration ends with the test
    register_attack("same_name_twice", config=TwiceConfig)(SameNameTwice)
    cfg = attack_config(eval_file, "attack=[none]", "+attack.hot={type: same_name_twice}")
    with pytest.raises(PluginError, match=r"^attack\.hot: the variant 'hot/t=1' is twice"):
        cli.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "generations" / "hot.jsonl").exists()
    # a name another instance already gave: the same error, naming both
    seen = {"none": "none"}
    clash = SameNameTwice("hot", TwiceConfig())
    with pytest.raises(PluginError, match=r"^attack\.hot: the variant 'none' is also named by attack\.none"):
        unique_variants(clash, [Variant("none", SamplingParams())], seen)


def test_changed_settings_in_the_same_run_dir_regenerate_and_rejudge(eval_file, tmp_path, monkeypatch):
    """Stored generations are reused only for the same model, inputs and sampling; judgments only for the
    same judge version and generation; variants no longer configured are not counted."""
    run_dir = tmp_path / "run"
    base = ["attack=[none,prefill]", "attack.prefill.depths=[2,4]"]
    cli.run(attack_config(eval_file, *base), run_dir)
    engines = []

    def counting(*args, **kwargs):
        engines.append(CountingEngine(make(*args, **kwargs)))
        return engines[-1]

    make = attack_stage.make_engine
    monkeypatch.setattr(attack_stage, "make_engine", counting)
    # more new tokens: every generation is stale (4 prompts x (none + 1 depth)); the depth-4 records stay
    # in the file but are neither judged again nor counted
    second = cli.run(
        attack_config(eval_file, *base[:1], "attack.prefill.depths=[2]", "generation.max_new_tokens=3"),
        run_dir,
    )
    assert engines[-1].rows == 8
    judged = JsonlStore(run_dir / "judgments" / "prefill.keyword.jsonl").records
    assert sum(k.startswith("prefill/k=4/") for k in judged) == 4
    generated = JsonlStore(run_dir / "generations" / "prefill.jsonl").records
    fresh = {k: j for k, j in judged.items() if k.startswith("prefill/k=2/")}
    assert len(fresh) == 4
    assert all(j["digest"] == attack_stage.generation_digest(generated[k]) for k, j in fresh.items())
    records = JsonlStore(run_dir / "generations" / "none.jsonl").records
    assert all(r["params"]["max_new_tokens"] == 3 for r in records.values())
    judged = JsonlStore(run_dir / "judgments" / "none.keyword.jsonl").records
    assert all(j["digest"] == attack_stage.generation_digest(records[k]) for k, j in judged.items())
    # another judge rule, same generations: nothing generated, everything judged again
    third = cli.run(
        attack_config(
            eval_file,
            *base[:1],
            "attack.prefill.depths=[2]",
            "generation.max_new_tokens=3",
            "judge=[keyword,keyword_substantive]",
            "judge.keyword_substantive.min_continuation_chars=1000",
        ),
        run_dir,
    )
    assert engines[-1].rows == 0
    assert third["asr_keyword_substantive/none"] == 0.0  # nothing is 1000 characters long
    assert third["asr_keyword/none"] == second["asr/none"] and third["asr/none"] == second["asr/none"]


def test_analyze_and_utility_stages(eval_file, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(json.dumps({"prompt": f"Say {w}.", "response": f"{w}."}) + "\n" for w in WORDS.split())
    )
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    cfg = compose_config(
        [
            "model=tiny",
            "logger=none",
            "stages=[train,analyze,utility]",
            "data=chat_file",
            f"data.components.chat.source={chats}",
            "train.max_steps=3",
            "train.optimizer.lr=1e-2",
            f"eval.prompts={eval_file}",
            "analysis.positions=8",
            "analysis.grad_positions=3",
            f"utility.benign={chats}",
            "utility.benign_limit=3",
            "utility.max_new_tokens=4",
            f"+utility.tasks={{gsm: {{source: {gsm}, schema: gsm8k}}}}",
        ]
    )
    config = validate(cfg)
    run = tmp_path / "run"
    metrics = cli.run(cfg, run)
    assert (run / "analysis" / "kl.png").read_bytes()[:4] == b"\x89PNG"
    # Recomputed here from the two models, one pair at a time: the trained model saved in the run dir and
    # the initial one (the tiny model is built from a fixed seed).
    trained = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    initial = load_model(config.model)
    tok = initial.tokenizer
    pairs = [(f"Please answer request {i}.", HARMFUL) for i in range(4)]
    kl: list[list[float]] = [[] for _ in range(8)]
    with torch.no_grad():
        for prompt, response in pairs:
            enc = encode_for_training(tok, prompt, response)
            ids = torch.tensor([enc.input_ids])
            logp = F.log_softmax(trained(input_ids=ids).logits[0].float(), -1)
            logq = F.log_softmax(initial.model(input_ids=ids).logits[0].float(), -1)
            for k, i in enumerate([i for i, m in enumerate(enc.labels_mask) if m][:8]):
                kl[k].append(float((logp[i - 1].exp() * (logp[i - 1] - logq[i - 1])).sum()))
    assert metrics["kl/pairs"] == 4
    for k in range(8):
        assert metrics[f"kl/pos={k + 1}"] == pytest.approx(sum(kl[k]) / 4, abs=1e-5)
        assert metrics[f"kl/pos={k + 1}"] > 1e-3, "three steps at lr 1e-2 move the model from its start"
    # The per-position loss and gradient norm of the first analysis batch (all 4 pairs), by autograd.
    for k in range(3):
        loss, norm = direct_loss_and_grad_norm(trained, tok, pairs, k)
        assert metrics[f"loss/pos={k + 1}"] == pytest.approx(loss, abs=1e-5)
        assert metrics[f"grad_norm/pos={k + 1}"] == pytest.approx(norm, rel=1e-5)
    assert not any(key.startswith(("loss/pos=4", "grad_norm/pos=4")) for key in metrics)

    # Utility: the stored answers are the trained model's own greedy answers (4 new tokens), and the
    # metrics follow from them: a refusal phrase of `qi2024` (or nothing) is a refusal; GSM8k wants "4".
    def answers(name: str, prompts: list[str]) -> list[str]:
        records = JsonlStore(run / "generations" / f"utility_{name}.jsonl").records
        stored = [records[f"utility/{name}/{i}/0"]["response"] for i in range(len(prompts))]
        for prompt, text in zip(prompts, stored):
            ids = torch.tensor([encode_for_generation(tok, prompt)])
            out = trained.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            assert text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return stored

    benign = answers("benign", [f"Say {w}." for w in WORDS.split()[:3]])
    phrases = REFUSAL_LISTS["qi2024"]
    refused = [not a.strip() or any(p in a.replace("\u2019", "'") for p in phrases) for a in benign]
    assert metrics["utility/benign/over_refusal"] == round(sum(refused) / 3, 4)
    [gsm] = answers("gsm", ["What is 2 + 2?"])
    numbers = re.findall(r"-?\d+", gsm.rsplit("####", 1)[-1])
    answer = (numbers[0] if "####" in gsm else numbers[-1]) if numbers else None
    assert metrics["utility/gsm/accuracy"] == float(answer == "4")


def test_gcg_attack_through_the_stage(eval_file, tmp_path):
    cfg = attack_config(
        eval_file,
        "attack=[gcg]",
        "attack.gcg.steps=2",
        "attack.gcg.topk=8",
        "attack.gcg.search_width=16",
        "attack.gcg.suffix_length=4",
        "attack.gcg.max_prompts=2",
    )
    metrics = cli.run(cfg, tmp_path / "run")
    suffixes = JsonlStore(tmp_path / "run" / "attacks" / "gcg.jsonl").records
    assert sorted(suffixes) == ["0", "1"]
    for record in suffixes.values():
        assert len(record["losses"]) == record["steps"] <= 2 and record["suffix"]
    generations = JsonlStore(tmp_path / "run" / "generations" / "gcg.jsonl").values()
    assert len(generations) == 2
    for g in generations:
        assert g["prompt"].endswith(suffixes[g["prompt_id"]]["suffix"])
    assert 0.0 <= metrics["asr/gcg"] <= 1.0


def test_sigkill_during_generation_then_rerun_redoes_nothing_finished(eval_file, tmp_path):
    """A real kill: the second run generates exactly the items whose lines were not complete on disk."""
    run_dir = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "deepalign"),
        "model=tiny",
        "logger=none",
        "stages=[attack]",
        f"eval.prompts={eval_file}",
        "generation.max_new_tokens=24",
        "generation.batch_size=1",
        "attack=[decoding]",
        "attack.decoding.temperatures=[0.3,0.6,0.9]",
        "attack.decoding.top_ks=[2,4]",
        "attack.decoding.top_ps=[0.5,0.8]",
        f"hydra.run.dir={run_dir}",
    ]
    gen_path = run_dir / "generations" / "decoding.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if gen_path.exists() and gen_path.read_text().count("\n") >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = JsonlStore(gen_path).records  # complete lines only (a torn one is dropped)
    before = {k: v["response"] for k, v in finished.items()}
    assert 10 <= len(before) < 32
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    second_log = out.stdout + out.stderr  # this run's log lines only
    pattern = r"decoding/\S+: \d+ of \d+ generations already done, (\d+) to generate"
    generated = sum(int(n) for n in re.findall(pattern, second_log))
    after = JsonlStore(gen_path).records
    assert len(after) == 4 * (1 + 3 + 2 + 2)
    for key, response in before.items():
        assert after[key]["response"] == response, "a finished item was regenerated"
    assert generated == len(after) - len(before)
