"""deepalign/plugins.py and the config's named instances: attacks and judges side by side by name, installed
plugins (entry points), clear errors for unknown names, `--help` listing the components."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, compose_config

from deepalign import cli
from deepalign.config import ConfigError, validate
from deepalign.plugins import ATTACKS, JUDGES, LOSSES, STAGES, PluginError, load_plugins

HARMFUL = "Sure, here is the list: " + " ".join(["alpha beta gamma delta"] * 8) + "."


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    rows = [{"prompt": f"Please answer request {i}.", "harmful": HARMFUL} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_built_ins_are_registered_like_plugins():
    assert {"sft", "constrained"} <= set(LOSSES) and LOSSES.get("constrained", "k").needs_reference
    assert not LOSSES.get("sft", "k").needs_reference
    assert {"none", "prefill", "decoding", "gcg"} <= set(ATTACKS)
    assert {"keyword", "rubric", "classifier"} <= set(JUDGES)
    assert {"train", "probe", "attack", "analyze", "utility", "quickstart"} <= set(STAGES)
    assert STAGES.get("train", "stages").model_dir == "model"
    assert STAGES.get("attack", "stages").sections == (
        "model", "eval", "attack", "judge", "generation", "data.system_prompt", "seed",
    )  # fmt: skip


def test_two_instances_of_one_type_side_by_side(eval_file, tmp_path):
    """Two prefill attacks and two keyword rules in one run, each under its own name, no schema field each."""
    cfg = compose_config(
        [
            "model=tiny",
            "logger=none",
            "stages=[attack]",
            f"eval.prompts={eval_file}",
            "generation.max_new_tokens=4",
            "attack=[prefill]",
            "attack.prefill.depths=[2]",
            "+attack.prefill_refusal={type: prefill, depths: [], strings: ['I cannot']}",
            "judge=[keyword]",
            "+judge.kw_strict={type: keyword, min_continuation_chars: 1000}",
        ]
    )
    config = validate(cfg)
    assert config.attack["prefill_refusal"].type == "prefill" and config.attack["prefill_refusal"].strings
    assert (
        config.judge["kw_strict"].type == "keyword"
        and config.judge["kw_strict"].min_continuation_chars == 1000
    )
    metrics = cli.run(cfg, tmp_path / "run")
    for key in (
        "asr/prefill/k=2",
        "asr/prefill_refusal/str=0",
        "asr_keyword/prefill_refusal/str=0",
        "asr_kw_strict/prefill/k=2",
    ):
        assert key in metrics, key
    assert metrics["asr_keyword/prefill_refusal/str=0"] == 0.0  # the prefill itself says "I cannot"
    assert metrics["asr_kw_strict/prefill/k=2"] == 0.0  # no 4-token answer adds 1000 characters
    assert (tmp_path / "run" / "generations" / "prefill_refusal.jsonl").is_file()
    assert (tmp_path / "run" / "judgments" / "prefill.kw_strict.jsonl").is_file()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+attack.mine={type: nope}", "attack.mine.type: unknown attack 'nope'"),
        ("+attack.mine={type: prefill, depth: [3]}", "attack.mine.depth"),
        ("+attack.mine={type: prefill, depths: [-1]}", "attack.mine.depths[0]"),
        ("+judge.mine={type: keyword, lists: [nope]}", None),  # judged in preflight: see below
        ("loss.name=nope", "loss.name: unknown loss 'nope'; registered: sft, constrained"),
        ("stages=[nope]", "stages: unknown stage 'nope'"),
        ("plugins=[no_such_module_here]", "plugins[0]: no module 'no_such_module_here'"),
    ],
)
def test_unknown_or_wrong_components_name_the_key(override, key):
    cfg = compose_config(["model=tiny", "logger=none", override])
    if key is None:
        config = validate(cfg)
        from deepalign.judges import check_judges

        with pytest.raises(ConfigError, match=r"judge\.mine\.lists\[0\]: unknown refusal list 'nope'"):
            check_judges(config.judge)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert key in str(err.value)


def test_a_null_instance_is_not_selected():
    config = validate(compose_config(["model=tiny", "attack=[none,prefill]", "attack.prefill=null"]))
    assert list(config.attack) == ["none"]


def test_a_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('oops in the plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"plugins\[1\]: plugin 'broken_plugin' failed to import: oops"):
        load_plugins(["json", "broken_plugin"])


def test_one_name_registered_by_two_modules_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "twice_plugin.py").write_text(
        "from deepalign.plugins import register_loss\n"
        "@register_loss('sft')\n"
        "def mine(policy_logps, reference_logps, mask, n_tokens, params):\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="loss 'sft' is registered twice: by deepalign.losses and by twice"):
        load_plugins(["twice_plugin"])


def test_one_module_registering_a_name_twice_is_an_error(tmp_path, monkeypatch):
    """A copied loss whose name was not changed: the second would silently replace the first."""
    (tmp_path / "copied_plugin.py").write_text(
        "from deepalign.plugins import register_loss\n"
        "@register_loss('test_registry_copied')\n"
        "def first(policy_logps, reference_logps, mask, n_tokens, params):\n    return 1\n"
        "@register_loss('test_registry_copied')\n"
        "def second(policy_logps, reference_logps, mask, n_tokens, params):\n    return 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(LOSSES, "_specs", dict(LOSSES._specs))
    with pytest.raises(
        PluginError,
        match=r"plugins\[0\]: plugin 'copied_plugin' failed to import: loss 'test_registry_copied' is "
        r"registered twice by copied_plugin: by first and by second; give one of them another name",
    ):
        load_plugins(["copied_plugin"])
    assert LOSSES.get("test_registry_copied", "loss.name").fn.__qualname__ == "first"
    sys.modules.pop("copied_plugin", None)


def test_a_module_run_again_registers_its_components_again(tmp_path, monkeypatch):
    """importlib.reload (an edited plugin in a notebook): the same definitions, the new functions."""
    import importlib

    (tmp_path / "reloaded_plugin.py").write_text(
        "from deepalign.plugins import register_loss\n"
        "@register_loss('test_registry_reloaded')\n"
        "def reloaded(policy_logps, reference_logps, mask, n_tokens, params):\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(LOSSES, "_specs", dict(LOSSES._specs))
    module = importlib.import_module("reloaded_plugin")
    first = LOSSES.get("test_registry_reloaded", "loss.name").fn
    module = importlib.reload(module)
    again = LOSSES.get("test_registry_reloaded", "loss.name").fn
    assert again is module.reloaded and again is not first
    sys.modules.pop("reloaded_plugin", None)


def installed_plugin(folder: Path) -> Path:
    """A package installed the way pip installs one: a module and a dist-info with an entry point."""
    folder.mkdir(parents=True)
    (folder / "installed_judge.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            from deepalign.judges import JudgeBase, Judgment
            from deepalign.plugins import register_judge


            @dataclass
            class LengthJudgeConfig:
                max_chars: int = 5
                show_prefill: bool = False


            @register_judge("length", config=LengthJudgeConfig)
            class LengthJudge(JudgeBase):
                def __init__(self, name, cfg, *, cache_dir=None):
                    self.name, self.cfg, self.version = name, cfg, f"length:{cfg.max_chars}"

                def _judge(self, items):
                    return [
                        Judgment(item.id, self.name, self.version, len(item.response) > self.cfg.max_chars,
                                 None, False)
                        for item in items
                    ]
            """
        )
    )
    dist = folder / "installed_judge-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: installed-judge\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[deepalign.plugins]\nlength = installed_judge\n")
    return folder


def test_an_installed_plugin_is_found_by_its_entry_point(tmp_path, eval_file):
    """No `plugins=` needed: the console script imports the entry points of the group deepalign.plugins
    before composing, so `--help` lists the judge and `judge.<name>={type: length}` runs."""
    folder = installed_plugin(tmp_path / "site")
    env = {
        "PYTHONPATH": str(folder),
        "WANDB_SILENT": "true",
        "DEEPALIGN_CPU_BF16": "0",
        "HOME": str(tmp_path),
    }
    script = str(Path(sys.executable).with_name("deepalign"))
    help_text = subprocess.run(
        [script, "--help"], env=env, capture_output=True, text=True, cwd=tmp_path, check=True
    ).stdout
    assert "judges (judge=[...]): " in help_text and "length" in help_text.split("judges (judge=[...]): ")[1]
    run_dir = tmp_path / "run"
    args = [
        "model=tiny",
        "logger=none",
        "stages=[attack]",
        f"eval.prompts={eval_file}",
        "generation.max_new_tokens=4",
        "attack=[none]",
        "judge=[keyword]",
        "+judge.short={type: length, max_chars: 0}",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run([script, *args], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # every non-empty answer is longer than 0 characters; empty ones never count (the rule of every judge)
    assert metrics["asr_short/none"] == pytest.approx(1.0 - metrics["eval/empty_rate/none"], abs=1e-4)


def test_command_line_plugins_are_read_before_composition():
    assert cli.command_line_plugins(["model=tiny", "plugins=[a,b.c]"]) == ["a", "b.c"]
    assert cli.command_line_plugins(["+plugins=one"]) == ["one"]
    assert cli.command_line_plugins(["plugins=[]"]) == []
    assert cli.command_line_plugins(["model.plugins=x"]) == []


def test_help_lists_the_registered_components():
    done = subprocess.run(
        [str(Path(sys.executable).with_name("deepalign")), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "losses (loss.name): sft, constrained" in done.stdout
    assert "attacks (attack=[...]): none, prefill, decoding, gcg" in done.stdout
    assert "stages (stages=[...]): " in done.stdout and "quickstart" in done.stdout
