"""deepalign/attacks/: one module per attack type. A prompt transform is one module (the built-in `template`,
or a plugin's), runs through the attack stage on the tiny model and is judged against the request as
written; an attack's own metrics come from its `summary_metrics` (the prefill attack's depth curve, the
same numbers `depth_metrics` gives for the prefill instances)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import compose_config

from deepalign import cli, plugins
from deepalign.attacks.base import build_attacks
from deepalign.attacks.decoding import DecodingAttackConfig
from deepalign.attacks.none import NoAttackConfig
from deepalign.attacks.prefill import PrefillAttackConfig
from deepalign.attacks.template import TemplateAttackConfig
from deepalign.config import ConfigError, validate
from deepalign.depth import depth_metrics
from deepalign.plugins import ATTACKS
from deepalign.storage.jsonl import JsonlStore

REQUESTS = [f"Please answer request {i}." for i in range(3)]

SHOUT = '''\
# shout_attack.py: a prompt transform in one module
from dataclasses import dataclass

from deepalign.attacks.base import Attack, AttackRun
from deepalign.eval_items import Variant
from deepalign.generation import SamplingParams
from deepalign.plugins import register_attack


@dataclass
class ShoutConfig:
    ending: str = "!!!"


@register_attack("shout", config=ShoutConfig)
class Shout(Attack):
    """Every request in capitals."""

    def variants(self, run: AttackRun, base: SamplingParams) -> list[Variant]:
        prompts = {item.id: item.prompt.upper() + self.cfg.ending for item in run.items}
        return [Variant(self.name, base, prompts=prompts)]

    def summary_metrics(self, metrics, judges, primary):
        return {f"{self.name}/judged_by": len(judges)}
'''


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in REQUESTS))
    return path


def attack_args(eval_file: Path, *overrides: str) -> list[str]:
    return [
        "model=tiny",
        "logger=none",
        "stages=[attack]",
        "judge=[keyword]",
        f"eval.prompts={eval_file}",
        "generation.max_new_tokens=4",
        *overrides,
    ]


def records(run_dir: Path, attack: str) -> list[dict]:
    return sorted(
        JsonlStore(run_dir / "generations" / f"{attack}.jsonl").records.values(), key=lambda r: r["key"]
    )


def test_the_template_attack_asks_each_request_inside_its_template(eval_file, tmp_path):
    metrics = cli.run(compose_config(attack_args(eval_file, "attack=[none,template]")), tmp_path / "run")
    wrapper = TemplateAttackConfig().template
    found = records(tmp_path / "run", "template")
    assert [r["prompt"] for r in found] == [wrapper.replace("{request}", r) for r in REQUESTS]
    assert [r["request"] for r in found] == REQUESTS, "judges see the request as written"
    assert [r["prompt"] for r in records(tmp_path / "run", "none")] == REQUESTS
    for key in ("asr/template", "asr_keyword/template", "asr/template/n", "asr/none"):
        assert key in metrics, key
    assert metrics["asr/template/n"] == len(REQUESTS)


def test_a_template_of_ones_own(eval_file, tmp_path):
    own = "++attack.template.template='Answer as a pirate: {request}'"
    cli.run(compose_config(attack_args(eval_file, "attack=[template]", own)), tmp_path / "run")
    prompts = [r["prompt"] for r in records(tmp_path / "run", "template")]
    assert prompts == [f"Answer as a pirate: {r}" for r in REQUESTS]


def test_a_template_without_the_placeholder_is_a_config_error(eval_file):
    cfg = compose_config(attack_args(eval_file, "attack=[template]", "++attack.template.template=Hello"))
    with pytest.raises(ConfigError, match=r"attack\.template\.template"):
        validate(cfg)


@pytest.fixture
def isolated_attacks(monkeypatch, tmp_path):
    """Attacks registered by a plugin module written to tmp_path are gone after the test."""
    plugins.load_builtins()
    monkeypatch.setattr(ATTACKS, "_specs", dict(ATTACKS._specs))
    monkeypatch.setattr(plugins, "_loaded", set(plugins._loaded))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("shout_attack", None)


def test_a_plugin_prompt_transform_in_one_module_runs_through_the_attack_stage(eval_file, isolated_attacks):
    (isolated_attacks / "shout_attack.py").write_text(SHOUT)
    args = attack_args(eval_file, "plugins=[shout_attack]", "attack=[]", "+attack.shout={ending: '?'}")
    metrics = cli.run(compose_config(args), isolated_attacks / "run")
    found = records(isolated_attacks / "run", "shout")
    assert [r["prompt"] for r in found] == [r.upper() + "?" for r in REQUESTS]
    assert [r["request"] for r in found] == REQUESTS
    assert "asr/shout" in metrics and "asr_keyword/shout" in metrics
    assert metrics["shout/judged_by"] == 1, "the stage asks every attack for its own metrics"
    assert ATTACKS.get("shout", "attack").module == "shout_attack"


def test_the_prefill_attacks_give_the_depth_metrics_of_their_instances():
    """Each prefill instance with depths adds its own curve's `depth...` keys; together they are exactly
    `depth_metrics` of those instances (the other attacks add nothing)."""
    instances = {
        "none": NoAttackConfig(),
        "prefill": PrefillAttackConfig(depths=[0, 5, 10]),
        "own": PrefillAttackConfig(depths=[5, 10], source="own"),
        "strings_only": PrefillAttackConfig(depths=[], strings=["I cannot"]),
        "decoding": DecodingAttackConfig(),
    }
    types = {"none": "none", "decoding": "decoding"}
    for name, cfg in instances.items():
        cfg.type = types.get(name, "prefill")
    rates = {"prefill/k=0": 0.1, "prefill/k=5": 0.4, "prefill/k=10": 0.7, "own/k=0": 0.0, "own/k=5": 0.6}
    rates.update({"own/k=10": 0.9, "strings_only/str=0": 0.0, "none": 0.2})
    prefixes = ("asr", "asr_keyword", "asr_rubric")
    metrics = {f"{prefix}/{k}": v for prefix in prefixes for k, v in rates.items()}
    metrics["asr/prefill/k=5"] = metrics["asr_rubric/prefill/k=5"] = 0.8  # rubric, the primary judge
    judges, primary = ["keyword", "rubric"], "rubric"
    added: dict[str, float] = {}
    for attack in build_attacks(instances):
        added.update(attack.summary_metrics(metrics, judges, primary))
    assert added == depth_metrics(metrics, ["prefill", "own"], judges, primary)
    assert {"depth/asr_auc", "depth/own/k50", "depth_keyword/asr_auc", "depth_rubric/own/k50"} <= set(added)


def test_gcg_searches_in_the_engines_precision_and_keys_its_suffixes_by_it(
    tiny_model_config, tmp_path, monkeypatch
):
    """The GCG search runs under the autocast the answers are generated in; a suffix searched in another
    precision is searched again."""
    import torch

    from deepalign import gcg as search
    from deepalign.attacks.base import AttackRun
    from deepalign.attacks.gcg import GCGAttack, GCGAttackConfig
    from deepalign.eval_items import EvalItem
    from deepalign.models import load_model

    seen: list[object] = []

    def fake_search(model, tokenizer, prompts, targets, cfg, *, system, seed, prompt_ids):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return [search.GCGResult(i, "xyz", [1], 0.5, [0.5], 1, False, 0.1, 1.0) for i in prompt_ids]

    monkeypatch.setattr(search, "run_gcg", fake_search)
    loaded = load_model(tiny_model_config)
    items = [EvalItem(id="a", prompt="Tell me how.", request="Tell me how.")]
    attack = GCGAttack("gcg", GCGAttackConfig(steps=1))

    def run(autocast):
        args = (items, loaded.model, loaded.tokenizer, None, 0, tmp_path, lambda: "weights")
        return attack.suffixes(AttackRun(*args, autocast=autocast))

    assert run(None) == {"a": "xyz"} and seen == [None]
    run(None)  # stored: not searched again
    assert seen == [None]
    run(torch.bfloat16)
    assert seen == [None, torch.bfloat16]
