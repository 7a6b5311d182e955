"""Every YAML file in conf/ composes and validates; bad configs fail naming the key before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from deepalign import cli
from deepalign.config import ConfigError, DeepAlignConfig, schema, validate

CONF = REPO / "conf"
# conf/quickstart/ holds the quickstart's sub-run layers (composed into quickstart.runs), not root options
GROUP_FILES = sorted(
    p for p in CONF.glob("*/*.yaml") if p.parent.name not in ("experiment", "local", "quickstart")
)
EXPERIMENTS = sorted(
    p.relative_to(CONF / "experiment").with_suffix("").as_posix()
    for p in (CONF / "experiment").rglob("*.yaml")
)
# Options that need a value the user must give (model=hf needs model.path, data presets their files).
DEMO = "demo:probe_chats"
REQUIRED = {
    ("model", "hf"): ["model.path=some-org/some-model"],
    ("data", "chat_file"): [f"data.components.chat.source={DEMO}"],
    ("data", "safety_sft"): [
        f"data.components.safety.source={DEMO}",
        f"data.components.utility.source={DEMO}",
    ],
    ("data", "safety_recovery"): [
        f"data.components.safety.source={DEMO}",
        f"data.components.utility.source={DEMO}",
    ],
    ("data", "attack_harmful"): [f"data.components.harmful.source={DEMO}"],
    ("data", "attack_identity_shift"): [f"data.components.aoa.source={DEMO}"],
    ("data", "attack_backdoor"): [f"data.components.clean.source={DEMO}"],
}


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}={p.stem}")
def test_every_group_option_composes_and_validates(path: Path):
    group, option = path.parent.name, path.stem
    selection = f"{group}=[{option}]" if group in ("attack", "judge") else f"{group}={option}"
    cfg = compose_config([selection, *REQUIRED.get((group, option), [])])
    config = validate(cfg)
    assert isinstance(config, DeepAlignConfig)
    if group in ("attack", "judge"):
        assert option in getattr(config, group)
        others = [k for k in getattr(config, group) if k != option]
        assert others == [], f"{group}={option} enabled {others} too"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(name: str):
    composed = compose_config([f"experiment={name}"])
    extra = REQUIRED.get(("data", composed.data.name), [])
    if {"attack", "analyze"} & set(composed.stages) and composed.eval.prompts is None:
        extra = [*extra, "eval.prompts=demo:harmful_prompts"]  # the paper presets leave the benchmark to you
    config = validate(compose_config([f"experiment={name}", *extra]))
    assert config.stages, "a preset must run at least one stage"


def test_defaults_are_the_demo_model_offline_wandb_and_plain_attack():
    config = validate(compose_config())
    assert config.model.name == "smollm2_135m_instruct" and config.model.source == "gguf"
    assert config.logger.name == "wandb" and config.logger.mode == "offline"
    assert set(config.attack) == {"none"}
    assert set(config.judge) == {"keyword"} and config.judge["keyword"].type == "keyword"
    assert config.model.trust_remote_code is False


def test_attack_suite_is_a_list_of_groups():
    config = validate(compose_config(["attack=[none,prefill,decoding,gcg]"]))
    assert config.attack["prefill"].depths == [0, 5, 10, 20, 40]
    assert config.attack["gcg"].suffix_length == 20 and config.attack["gcg"].search_width == 512
    assert len(config.attack["decoding"].temperatures) == 20


def test_constrained_loss_has_the_papers_schedule():
    beta = validate(compose_config(["loss=constrained"])).loss.beta
    assert (beta.first, beta.prefix, beta.prefix_len, beta.rest) == (0.5, 2.0, 5, 0.1)


def test_interpolations_resolve():
    config = validate(compose_config(["paths.cache_dir=/tmp/somewhere", "seed=7"]))
    assert config.model.cache_dir == "/tmp/somewhere/models"
    assert config.train.seed == 7


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.optimizer.lr=abc"], "train.optimizer.lr"),
        (["train.per_device_batch_size=1.5"], "train.per_device_batch_size"),
        (["loss.beta.frist=1"], "loss.beta.frist"),
    ],
)
def test_wrong_type_or_unknown_key_fails_at_composition_naming_the_key(overrides, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(overrides)
    cause = info.value.__cause__
    assert isinstance(cause, (ValidationError, ConfigKeyError, ConfigAttributeError))
    assert cause.full_key == key


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.name=???"], "model.name"),
        (["+model.weights=foo"], "model.weights"),
        (["+train.lora.rank=4"], "train.lora.rank"),
        (["model=hf"], "model.path"),
        (["loss=constrained", "loss.beta.first=-1"], "loss.beta.first"),
        (["loss=constrained", "loss.beta.rest=0"], "loss.beta.rest"),
        (["loss.beta.values=[0.5,-2]"], "loss.beta.values[1]"),
        (["model.dtype=fp8"], "model.dtype"),
        (["model.device=tpu"], "model.device"),
        (["attack=[prefill]", "attack.prefill.depths=[5,-1]"], "attack.prefill.depths[1]"),
        (["attack=[decoding]", "attack.decoding.top_ps=[0.5,1.5]"], "attack.decoding.top_ps[1]"),
        (["train.optimizer.lr=0"], "train.optimizer.lr"),
        (["train.optimizer.betas=[0.9]"], "train.optimizer.betas"),
        (["stages=[probe,bogus]"], "stages"),
        (["logger.mode=sometimes"], "logger.mode"),
        (["model=tiny", "~model.arch.model_type"], "model.arch"),
    ],
)
def test_bad_values_fail_validation_naming_the_key(overrides, key):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(f"{key}:"), str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.beta.first=inf", "loss.beta.first: must be a finite number, got inf"),
        ("train.optimizer.lr=inf", "train.optimizer.lr: must be a finite number, got inf"),
        ("train.optimizer.eps=nan", "train.optimizer.eps: must be a finite number, got nan"),
        ("train.optimizer.betas=[0.9,-inf]", "train.optimizer.betas[1]: must be a finite number, got -inf"),
        ("loss.beta.values=[0.5,nan]", "loss.beta.values[1]: must be a finite number, got nan"),
        ("train.max_grad_norm=inf", "train.max_grad_norm: must be a finite number, got inf"),
        ("+model.arch.rms_norm_eps=nan", "model.arch.rms_norm_eps: must be a finite number, got nan"),
    ],
)
def test_non_finite_numbers_fail_validation_naming_the_key(override, message):
    """An inf learning rate or beta trains to NaN weights whose empty answers would count as refusals."""
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["model=tiny", "loss=constrained", override]))
    assert str(info.value) == message


def test_bad_config_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr("deepalign.models.load_model", forbidden)
    monkeypatch.setattr("deepalign.models.convert_gguf", forbidden)
    cfg = compose_config(["model=tiny", "logger=none", "loss=constrained", "loss.beta.prefix=-2"])
    with pytest.raises(ConfigError, match=r"^loss\.beta\.prefix:"):
        cli.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_schema_round_trips_through_yaml():
    cfg = compose_config(["model=tiny", "attack=[none,prefill]", "judge=[keyword,rubric]"])
    again = OmegaConf.create(OmegaConf.to_yaml(cfg))
    assert validate(OmegaConf.merge(OmegaConf.structured(schema()), again)) == validate(cfg)
