"""The safelora stage: the paper's projection on small matrices, and the stage end to end on tiny models (the
projected model is saved, the attack stage evaluates it, a rerun redoes nothing, bad inputs fail early)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from safetensors.torch import load_file

from deepalign import cli
from deepalign.config import ConfigError, validate
from deepalign.models import load_model
from deepalign.stages.safelora import (
    _merged,
    check_same_architecture,
    safelora_projection,
    safelora_weight,
    selected_weights,
    similarity,
)
from deepalign.storage.jsonl import JsonlStore

SELECTED = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in ("q", "v")]
KEPT = SELECTED[0]  # the one layer whose fine-tuning update lies along the alignment direction


def direct(
    w_ft: torch.Tensor, w_aligned: torch.Tensor, w_unaligned: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The paper's formulas in float64, written out: (W_aligned + C dW, cosine similarity of dW and C dW)."""
    v = (w_aligned - w_unaligned).double()
    delta = (w_ft - w_aligned).double()
    c = v @ v.T / torch.sqrt((v**2).sum())
    projected = c @ delta
    s = (delta * projected).sum() / (torch.sqrt((delta**2).sum()) * torch.sqrt((projected**2).sum()))
    return w_aligned.double() + projected, float(s)


def unit(g: torch.Generator, n: int) -> torch.Tensor:
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return x / x.norm()


# ---------------------------------------------------------------- the projection


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_projection_and_similarity_match_the_papers_formulas(shape):
    g = torch.Generator().manual_seed(0)
    w_unaligned, w_aligned, w_ft = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    expected, s = direct(w_ft, w_aligned, w_unaligned)
    v, delta = w_aligned - w_unaligned, w_ft - w_aligned
    projected = safelora_projection(v, delta)
    assert torch.allclose(w_aligned + projected, expected, atol=1e-12)
    assert similarity(delta, projected) == pytest.approx(s, abs=1e-12)
    assert 0 < s < 1  # C is positive semi-definite: never negative
    # the threshold decides: just above s the layer is projected, just below it keeps its fine-tuned weight
    new, got, projected_ = safelora_weight(w_ft, w_aligned, w_unaligned, s + 1e-6, dtype=torch.float64)
    assert projected_ and got == pytest.approx(s, abs=1e-12) and torch.allclose(new, expected, atol=1e-12)
    new, _, projected_ = safelora_weight(w_ft, w_aligned, w_unaligned, s - 1e-6, dtype=torch.float64)
    assert not projected_ and torch.equal(new, w_ft)


def test_an_update_along_the_alignment_direction_is_kept():
    g = torch.Generator().manual_seed(1)
    u, a, w = unit(g, 8), unit(g, 6), unit(g, 6)
    w_aligned = torch.randn(8, 6, generator=g, dtype=torch.float64)
    w_unaligned = w_aligned - 3.0 * torch.outer(u, a)  # V = 3 u a^T: rank 1
    w_ft = w_aligned + 0.1 * torch.outer(u, w)  # dW in the column space of V
    new, s, projected = safelora_weight(w_ft.float(), w_aligned.float(), w_unaligned.float(), 0.5)
    assert s == pytest.approx(1.0, abs=1e-5) and not projected
    assert torch.equal(new, w_ft.float())


def test_an_update_orthogonal_to_the_alignment_direction_is_removed():
    g = torch.Generator().manual_seed(2)
    u, a = unit(g, 8), unit(g, 6)
    w_aligned = torch.randn(8, 6, generator=g, dtype=torch.float64)
    w_unaligned = w_aligned - 3.0 * torch.outer(u, a)
    delta = torch.randn(8, 6, generator=g, dtype=torch.float64)
    delta -= torch.outer(u, u @ delta)  # every column orthogonal to u: C dW = 0
    new, s, projected = safelora_weight(w_aligned + delta, w_aligned, w_unaligned, 0.5, dtype=torch.float64)
    assert s == pytest.approx(0.0, abs=1e-12) and projected  # 0 up to rounding
    assert torch.allclose(new, w_aligned, atol=1e-12)
    # no alignment direction at all (V = 0): the same, without dividing by zero
    w_ft, w_aligned = (w_aligned + delta).float(), w_aligned.float()  # a float32 model, computed in float32
    new, s, projected = safelora_weight(w_ft, w_aligned, w_aligned.clone(), 0.5)
    assert s == 0.0 and projected and torch.equal(new, w_aligned)
    # threshold 0 never projects (s >= 0)
    _, _, projected = safelora_weight(w_ft, w_aligned, w_unaligned.float(), 0.0)
    assert not projected


# ---------------------------------------------------------------- tiny models


def tiny(seed: int, *overrides: str):
    return load_model(validate(compose_config(["model=tiny", f"model.seed={seed}", *overrides])).model)


def save(loaded, folder: Path) -> None:
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def test_selected_weights_match_whole_module_names():
    model = tiny(0).model
    assert sorted(selected_weights(model, ["q_proj", "v_proj"])) == sorted(SELECTED)
    assert selected_weights(model, ["proj"]) == {}
    assert sorted(selected_weights(model, ["layers.1.mlp.down_proj"])) == [
        "model.layers.1.mlp.down_proj.weight"
    ]


def test_another_architecture_is_named_before_any_work():
    model, other = tiny(0).model, tiny(0, "model.arch.intermediate_size=96").model
    check_same_architecture(model, {"safelora.aligned": tiny(1).model})  # same names and shapes: fine
    with pytest.raises(ConfigError, match=r"safelora\.unaligned: .*mlp\.\w+_proj\.weight is \[") as err:
        check_same_architecture(model, {"safelora.unaligned": other})
    assert "share the architecture and parameter names" in str(err.value)


def test_a_lora_model_is_merged_into_plain_weights():
    from peft import LoraConfig, get_peft_model

    model = tiny(0).model
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    merged = _merged(peft_model)
    weights = dict(merged.named_parameters())
    assert weights.keys() == base.keys()
    assert not torch.equal(weights[SELECTED[0]], base[SELECTED[0]])  # q_proj changed by B A
    assert torch.equal(weights[SELECTED[1]], base[SELECTED[1]])  # v_proj had no adapter


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Three tiny models in HF folders: `aligned`; `unaligned`, the aligned one less a rank-1 alignment
    direction V = u a^T in each q/v projection; `ft`, fine-tuned from the aligned one: along u in layer 0's
    q_proj (kept), random elsewhere (projected)."""
    root = tmp_path_factory.mktemp("models")
    loaded = tiny(2)
    params = dict(loaded.model.named_parameters())
    aligned = {n: params[n].detach().clone() for n in SELECTED}
    save(loaded, root / "aligned")
    g = torch.Generator().manual_seed(3)
    directions = {n: unit(g, w.shape[0]).float() for n, w in aligned.items()}
    with torch.no_grad():
        for name, w in aligned.items():
            params[name].copy_(w - 2.0 * torch.outer(directions[name], unit(g, w.shape[1]).float()))
        save(loaded, root / "unaligned")
        for name, w in aligned.items():
            along = torch.outer(directions[name], unit(g, w.shape[1]).float())
            params[name].copy_(w + 0.05 * (along if name == KEPT else torch.randn(w.shape, generator=g)))
        save(loaded, root / "ft")
    return root


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Please answer request {i}."}) + "\n" for i in range(3)))
    return path


def run_config(models: Path, eval_file: Path, *overrides: str, model: str = "ft"):
    return compose_config(
        [
            "model=hf",
            f"model.path={models / model}",
            "model.name=tinyhf",
            "model.dtype=float32",
            "model.device=cpu",
            "logger=none",
            "stages=[safelora,attack]",
            f"safelora.unaligned={models / 'unaligned'}",
            f"safelora.aligned={models / 'aligned'}",
            f"eval.prompts={eval_file}",
            "generation.max_new_tokens=4",
            "attack=[none]",
            "judge=[keyword]",
            *overrides,
        ]
    )


def model_ids(run_dir: Path) -> set[str]:
    return {r["model_id"] for r in JsonlStore(run_dir / "generations" / "none.jsonl").records.values()}


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def test_the_stage_saves_the_projected_model_and_the_attack_evaluates_it(models, eval_file, tmp_path, caplog):
    run_dir = tmp_path / "run"
    metrics = cli.run(run_config(models, eval_file), run_dir)

    weights = {n: load_file(models / m / "model.safetensors") for n, m in [("ft", "ft"), ("a", "aligned")]}
    unaligned = load_file(models / "unaligned" / "model.safetensors")
    saved = load_file(run_dir / "safelora" / "model" / "model.safetensors")
    sims = {}
    for name in SELECTED:
        expected, sims[name] = direct(weights["ft"][name], weights["a"][name], unaligned[name])
        if name == KEPT:
            assert sims[name] == pytest.approx(1.0, abs=1e-4)
            assert torch.equal(saved[name], weights["ft"][name])
        else:
            assert sims[name] < 0.5
            assert torch.allclose(saved[name].double(), expected, atol=1e-6), name
            assert not torch.allclose(saved[name], weights["ft"][name], atol=1e-3)
    for name, w in weights["ft"].items():  # the layers not selected are the fine-tuned model's
        if name not in SELECTED:
            assert torch.equal(saved[name], w), name

    assert metrics["safelora/layers"] == 4 and metrics["safelora/projected_layers"] == 3
    assert metrics["safelora/mean_similarity"] == pytest.approx(sum(sims.values()) / 4, abs=1e-5)
    layers = json.loads((run_dir / "safelora" / "layers.json").read_text())["layers"]
    assert [row["name"] for row in layers] == SELECTED
    assert [row["projected"] for row in layers] == [False, True, True, True]
    assert [row["similarity"] for row in layers] == pytest.approx([sims[n] for n in SELECTED], abs=1e-5)
    assert "asr/none" in metrics and not (run_dir / "safelora" / "model.tmp").exists()

    # the attack evaluated the saved model: the same weights as an attack on that folder, not the ft model's
    plain, direct_run = tmp_path / "plain", tmp_path / "direct"
    cli.run(run_config(models, eval_file, "stages=[attack]"), plain)
    cli.run(
        run_config(models, eval_file, "stages=[attack]", model=str(run_dir / "safelora" / "model")),
        direct_run,
    )
    assert len(model_ids(run_dir)) == 1
    assert model_ids(run_dir) == model_ids(direct_run) and model_ids(run_dir) != model_ids(plain)

    # the same command again redoes nothing
    saved_files = files(run_dir / "safelora" / "model")
    caplog.set_level(logging.INFO)
    again = cli.run(run_config(models, eval_file), run_dir)
    assert "stage safelora: already done" in caplog.text and "stage attack: already done" in caplog.text
    assert files(run_dir / "safelora" / "model") == saved_files
    assert again["asr/none"] == metrics["asr/none"]


def test_aligned_defaults_to_the_runs_model(models, eval_file, tmp_path):
    """safelora.aligned unset: the run's model is the aligned one, so there is no update and the saved model
    is the run's model (every layer at similarity 0, reset to itself)."""
    run_dir = tmp_path / "run"
    metrics = cli.run(run_config(models, eval_file, "stages=[safelora]", "safelora.aligned=null"), run_dir)
    assert metrics["safelora/projected_layers"] == 4 and metrics["safelora/mean_similarity"] == 0
    saved = load_file(run_dir / "safelora" / "model" / "model.safetensors")
    ft = load_file(models / "ft" / "model.safetensors")
    assert saved.keys() == ft.keys() and all(torch.equal(saved[n], ft[n]) for n in ft)


def test_a_model_of_another_architecture_fails_before_anything_is_saved(models, eval_file, tmp_path):
    other = tmp_path / "other"
    save(tiny(0, "model.arch.intermediate_size=96"), other)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^safelora\.unaligned: not the fine-tuned model's architecture"):
        cli.run(run_config(models, eval_file, "stages=[safelora]", f"safelora.unaligned={other}"), run_dir)
    assert not (run_dir / "safelora").exists()


def test_config_errors_name_the_key(models, tmp_path):
    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            validate(compose_config(["model=tiny", "logger=none", "stages=[safelora]", *overrides]))
        return str(err.value)

    assert error().startswith("safelora.unaligned: the base model before alignment is required")
    unaligned = f"safelora.unaligned={models / 'unaligned'}"
    assert error(unaligned, "safelora.threshold=1.5").startswith("safelora.threshold: must be in [0, 1]")
    assert error(unaligned, "safelora.modules=[]").startswith("safelora.modules:")
    assert error(f"safelora.unaligned={tmp_path / 'missing'}").startswith(
        "safelora.unaligned: no such folder"
    )
    assert error(unaligned, f"safelora.aligned={tmp_path}").startswith("safelora.aligned: no model files")
    config = validate(compose_config(["model=tiny", "logger=none", "stages=[safelora]", unaligned]))
    assert config.safelora.threshold == 0.5 and config.safelora.modules == ["q_proj", "v_proj"]


def test_a_lora_run_without_merge_is_merged_before_the_projection(models, tmp_path):
    """train.lora.merge=false: the run's model is the initial one plus the adapter; the stage merges it and
    saves plain weights under the initial model's parameter names."""
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": f"{w}."}) + "\n" for w in "ab"))
    run_dir = tmp_path / "run"
    overrides = ["stages=[train,safelora]", "data=chat_file", f"data.components.chat.source={chats}"]
    overrides += ["train=lora", "train.lora.merge=false", "train.max_steps=2", "train.optimizer.lr=1e-2"]
    metrics = cli.run(run_config(models, tmp_path, *overrides, "eval.prompts=null", model="aligned"), run_dir)
    assert (run_dir / "adapter").is_dir() and not (run_dir / "model").exists()
    assert metrics["safelora/layers"] == 4
    saved = load_file(run_dir / "safelora" / "model" / "model.safetensors")
    aligned = load_file(models / "aligned" / "model.safetensors")
    assert saved.keys() == aligned.keys()
    changed = [n for n in SELECTED if not torch.equal(saved[n], aligned[n])]
    assert changed, "the adapter's update was merged into q_proj / v_proj"
