"""The paper presets (conf/experiment/paper/): each composes with the paper's values, and each runs end to end
on the tiny model with small local files in place of the gated hub sets (a few steps, prompts and tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, compose_config
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from deepalign import cli
from deepalign.config import ConfigError, register_configs, validate

PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment" / "paper").glob("*.yaml"))
HARMFUL = (
    "Sure, here is a detailed plan. First gather the materials, then prepare the workspace, then follow "
    "each of the steps below carefully and in order, checking the result after every single step until "
    "the whole procedure is complete and nothing at all is left to chance."
)
# Shrinks any preset to seconds on the tiny model; every other value stays the preset's own.
TINY = [
    "model=tiny",
    "logger=none",
    "judge=[keyword]",  # the rubric judge needs an API key
    "eval.limit=2",
    "generation.max_new_tokens=4",
    "train.max_steps=2",
    "train.per_device_batch_size=4",
    "train.gradient_accumulation_steps=1",
    "train.bf16=false",
]
# augmentation: the paper's epoch is 1280 examples; one decoding setting besides greedy, one short GCG
TINY_AUGMENTATION = [
    "data.size=10",
    "attack.decoding.temperatures=[1.0]",
    "attack.decoding.top_ks=[]",
    "attack.decoding.top_ps=[]",
    "attack.gcg.steps=1",
    "attack.gcg.search_width=8",
    "attack.gcg.topk=8",
    "attack.gcg.suffix_length=3",
    "attack.gcg.max_prompts=1",
]


def _jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model_config) -> dict[str, Path]:
    """Local stand-ins for the paper's data and models: triplets, utility chats, harmful pairs, a harmful
    evaluation set, and the tiny model saved as an HF folder (the KL reference)."""
    from deepalign.models import load_model

    d = tmp_path_factory.mktemp("paper")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    base = d / "base"
    loaded = load_model(tiny_model_config)
    loaded.model.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
    return {
        "triplets": _jsonl(
            d / "triplets.jsonl",
            [
                {"prompt": f"How do I {w}?", "harmful": HARMFUL, "refusal": "I cannot help with that."}
                for w in words
            ],
        ),
        "chats": _jsonl(d / "chats.jsonl", [{"prompt": f"Say {w}.", "response": f"{w} {w}."} for w in words]),
        "pairs": _jsonl(d / "pairs.jsonl", [{"prompt": f"Explain {w}.", "response": HARMFUL} for w in words]),
        "eval": _jsonl(
            d / "eval.jsonl", [{"prompt": f"Harmful request {i}.", "harmful": HARMFUL} for i in range(3)]
        ),
        "base": base,
    }


def _sources(name: str, sources: dict[str, Path]) -> list[str]:
    """The preset with the local stand-ins for what the user must give (benchmark, data, KL reference)."""
    given = [f"experiment=paper/{name}", f"eval.prompts={sources['eval']}"]
    if name == "augmentation":
        given += [
            f"data.components.safety.source={sources['triplets']}",
            f"data.components.utility.source={sources['chats']}",
        ]
    elif name == "kl":
        given += [f"analysis.reference={sources['base']}"]
    elif name != "prefill":
        given += [f"data.components.harmful.source={sources['pairs']}"]
    return given


def _tiny(name: str, sources: dict[str, Path], out: Path) -> list[str]:
    extra = TINY_AUGMENTATION if name == "augmentation" else []
    return [*_sources(name, sources), *TINY, *extra, f"paths.output_dir={out}"]


def test_presets_carry_the_papers_values(sources):
    paper = {name: validate(compose_config(_sources(name, sources))) for name in PRESETS}
    assert set(paper) == {
        "augmentation",
        "beta_ablation",
        "finetune_constrained",
        "finetune_sft",
        "kl",
        "prefill",
    }
    for config in paper.values():
        assert config.model.path == "meta-llama/Llama-2-7b-chat-hf" and config.model.dtype == "bfloat16"

    kl = paper["kl"]
    assert kl.stages == ["analyze"] and kl.analysis.positions == 20

    prefill = paper["prefill"]
    assert prefill.stages == ["attack"] and prefill.attack["prefill"].depths == [0, 5, 10, 20, 40]
    g = prefill.generation
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.max_new_tokens) == (True, 0.9, 0.6, 50, 512)
    assert prefill.data.system_prompt is None
    assert {"rubric", "keyword"} <= set(prefill.judge)

    aug = paper["augmentation"]
    safety = aug.data.components["safety"]
    assert aug.data.safety_share == 0.2 and safety.recovery and safety.recovery_prob == 0.5
    assert safety.recovery_max_k == 100 and aug.data.max_length == 512
    assert aug.train.optimizer.lr == 2e-5 and aug.train.optimizer.betas == [0.9, 0.999]
    assert aug.train.epochs == 10 and aug.train.warmup_steps == 0 and aug.train.bf16
    assert (
        aug.train.per_device_batch_size * aug.train.gradient_accumulation_steps == 80
    )  # 16 safety + 64 utility
    assert aug.loss.name == "sft"
    assert set(aug.attack) == {"none", "prefill", "decoding", "gcg"}

    for name in ("finetune_sft", "finetune_constrained", "beta_ablation"):
        t = paper[name].train
        assert t.optimizer.lr == 2e-5 and t.optimizer.betas == [0.5, 0.999] and t.epochs == 25
        assert t.per_device_batch_size * t.gradient_accumulation_steps == 64
        assert paper[name].data.components["harmful"].limit == 100
    assert paper["finetune_sft"].loss.name == "sft" and paper["finetune_sft"].train.warmup_steps == 0
    constrained = paper["finetune_constrained"]
    beta = constrained.loss.beta
    assert constrained.loss.name == "constrained" and constrained.train.warmup_steps == 10
    assert (beta.first, beta.prefix, beta.prefix_len, beta.rest, beta.values) == (0.5, 2.0, 5, 0.1, None)

    uniform = paper["beta_ablation"].loss.beta  # one beta everywhere: first and prefix follow rest
    assert (uniform.first, uniform.prefix, uniform.rest) == (0.1, 0.1, 0.1)
    swept = validate(compose_config([*_sources("beta_ablation", sources), "loss.beta.rest=2"]))
    assert (swept.loss.beta.first, swept.loss.beta.prefix) == (2.0, 2.0)


def test_beta_ablation_declares_its_grid():
    register_configs()
    with initialize_config_module(config_module="deepalign.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=paper/beta_ablation"], return_hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == {"loss.beta.rest": "0.1,2.0"}


def test_presets_name_the_missing_benchmark():
    with pytest.raises(ConfigError, match="eval.prompts"):
        validate(compose_config(["experiment=paper/prefill"]))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_on_the_tiny_model(name, sources, tmp_path):
    metrics = cli.run(compose_config(_tiny(name, sources, tmp_path / "out")), tmp_path / "run")
    assert set(json.loads((tmp_path / "run" / "metrics.json").read_text())) == set(metrics)
    if name == "kl":
        assert metrics["kl/pairs"] == 2 and "kl/pos=20" in metrics
        assert metrics["kl/pos=1"] == pytest.approx(0.0, abs=1e-4)  # the reference is the same tiny model
        return
    expected = {
        "prefill": ["asr/prefill/k=0", "asr/prefill/k=40"],
        "augmentation": ["asr/none", "asr/prefill/k=40", "asr/decoding", "asr/gcg", "data/recovery/share_k0"],
    }.get(name, ["asr/none", "train/last_loss"])
    for key in expected:
        assert key in metrics, key
    for key, value in metrics.items():
        if key.startswith("asr/") and not key.endswith("/n"):  # rates and their bounds; /n counts prompts
            assert 0.0 <= value <= 1.0
    if name != "prefill":
        assert metrics["train/steps"] == 2
