"""The loss contract with `LossInputs`: a loss in a module of one's own that asks for the hidden states trains
through the real command line exactly like SFT when its extra term is off, and its extra term is the formula
on the model's own hidden states, gradients included; the log-probs at chosen token ids and the log-probs
without the LoRA adapter are what they say, padded and packed; typed loss settings and the registration
rules fail naming the key or the loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from test_training import tiny_config, tiny_overrides, write_chats

from deepalign import plugins
from deepalign.chat import encode_for_training
from deepalign.config import validate
from deepalign.data import build_mixture
from deepalign.errors import ConfigError
from deepalign.logprobs import token_logprobs
from deepalign.models import load_model
from deepalign.plugins import LOSSES, PluginError, register_loss
from deepalign.training import (
    IGNORE,
    AlignmentTrainer,
    Collator,
    TokenDataset,
    prepare_model,
    training_arguments,
)

HIDDEN_L2 = """\
from deepalign.plugins import register_loss

@register_loss("hidden_l2", needs=("hidden_states",))
def hidden_l2(inputs, params):
    sft = -(inputs.policy_logps[inputs.mask]).sum() / inputs.n_tokens
    h = inputs.hidden_states[-1][inputs.mask]
    return sft + float(params.get("coef", 0.0)) * h.pow(2).mean()
"""


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl")


@pytest.fixture
def isolated_losses(monkeypatch):
    """Losses registered during a test are gone after it."""
    plugins.load_builtins()
    monkeypatch.setattr(LOSSES, "_specs", dict(LOSSES._specs))
    monkeypatch.setattr(plugins, "_loaded", set(plugins._loaded))


@pytest.fixture
def hidden_l2(tmp_path, monkeypatch, isolated_losses) -> Path:
    """hidden_l2.py in a folder of its own, importable in this process and by the command line."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "hidden_l2.py").write_text(HIDDEN_L2)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("hidden_l2", None)


def cli_losses(folder: Path, chat_file: Path, run_dir: Path, *extra: str) -> list[float]:
    """`train/loss` of each step of a 3-step run of the real command line, `folder` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "deepalign",
        "plugins=[hidden_l2]",
        *tiny_overrides(chat_file),
        "train.max_steps=3",
        f"paths.cache_dir={run_dir.parent / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def test_hidden_l2_with_coefficient_zero_trains_as_sft_through_the_command_line(
    hidden_l2, chat_file, tmp_path
):
    hidden = cli_losses(
        hidden_l2, chat_file, tmp_path / "hidden", "loss.name=hidden_l2", "++loss.params.coef=0.0"
    )
    sft = cli_losses(hidden_l2, chat_file, tmp_path / "sft", "loss.name=sft")
    assert len(hidden) == len(sft) == 3
    for a, b in zip(hidden, sft, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def first_batch(config, tok, *, packing: bool = False) -> tuple[TokenDataset, dict[str, torch.Tensor]]:
    """The dataset of the first 4 examples of `config`'s data, and them as one collated batch."""
    examples, _ = build_mixture(config.data, tok)
    dataset = TokenDataset(
        [encode_for_training(tok, e.prompt, e.response, max_length=64) for e in examples[:4]]
    )
    return dataset, Collator(tok.pad_token_id, packing=packing)([dataset[i] for i in range(4)])


def make_trainer(config, model, dataset: TokenDataset, out_dir: Path) -> AlignmentTrainer:
    return AlignmentTrainer(
        model=model,
        args=training_arguments(config.train, out_dir),
        train_dataset=dataset,
        data_collator=Collator(0),
        loss_config=config.loss,
    )


def test_hidden_l2_loss_is_the_formula_and_its_gradient_reaches_the_hidden_states(
    hidden_l2, chat_file, tmp_path
):
    config = validate(
        tiny_config(chat_file, "plugins=[hidden_l2]", "loss.name=hidden_l2", "++loss.params.coef=1.0")
    )
    loaded = load_model(config.model)
    model, tok = loaded.model, loaded.tokenizer
    dataset, batch = first_batch(config, tok)
    trainer = make_trainer(config, model, dataset, tmp_path / "out")
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # the same step computed directly: the model's full logits and its own hidden states
    mask = batch["labels"] != IGNORE
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    sft = -(token_logprobs(out.logits, batch["input_ids"])[mask]).sum() / mask.sum()
    penalty = out.hidden_states[-1][mask].pow(2).mean()
    assert float(penalty.detach()) > 0.1 and float(loss.detach()) > float(sft.detach()) + 0.1
    assert float(loss.detach()) == pytest.approx(float((sft + penalty).detach()), abs=1e-5)
    (sft + penalty).backward(retain_graph=True)
    direct = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == direct.keys()
    for n in direct:
        torch.testing.assert_close(grads[n], direct[n], atol=1e-5, rtol=1e-4, msg=n)
    model.zero_grad()
    penalty.backward()  # what the hidden-state term alone adds: it reaches the layers below
    added = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert float(added["model.norm.weight"].abs().max()) > 1e-2
    assert float(added["model.layers.1.mlp.down_proj.weight"].abs().max()) > 1e-5


@dataclass
class RefusalTokens:
    logits_at: list[int] = field(default_factory=list)  # the token ids whose log-probs the loss reads


def recording(name: str, **register) -> list:
    """Register an SFT loss under `name` that keeps the `LossInputs` it receives."""
    calls: list = []

    @register_loss(name, **register)
    def record(inputs, params):
        calls.append(inputs)
        return -(inputs.policy_logps[inputs.mask]).sum() / inputs.n_tokens

    return calls


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_logits_at_are_the_log_probs_of_the_chosen_ids_at_every_position(
    chat_file, isolated_losses, packing, tmp_path
):
    calls = recording("test_contracts_logits_at", needs=("logits_at",), config=RefusalTokens)
    config = validate(
        tiny_config(chat_file, "loss.name=test_contracts_logits_at", "++loss.params.logits_at=[3,17,42]")
    )
    loaded = load_model(config.model)
    model, tok = loaded.model, loaded.tokenizer
    dataset, batch = first_batch(config, tok, packing=packing)
    model.train()
    make_trainer(config, model, dataset, tmp_path / "out").compute_loss(model, batch)
    (inputs,) = calls
    assert inputs.config == RefusalTokens([3, 17, 42])
    assert inputs.hidden_states is None and inputs.no_adapter_logps is None and inputs.reference_logps is None
    at = inputs.logits_at
    assert at.shape == (*inputs.mask.shape, 3) and at.requires_grad
    _, padded = first_batch(config, tok)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    expected = torch.log_softmax(logits[:, :-1].float(), dim=-1)[..., [3, 17, 42]]
    mask = inputs.mask
    assert mask.equal(padded["labels"] != IGNORE)
    torch.testing.assert_close(at[:, 1:][mask[:, 1:]], expected[mask[:, 1:]], atol=1e-5, rtol=0)
    assert not at[:, 0].any()  # nothing predicts a sequence's first token


def test_no_adapter_logps_are_the_model_without_its_lora_adapter(chat_file, isolated_losses, tmp_path):
    calls = recording("test_contracts_no_adapter", needs=("no_adapter",))
    config = validate(
        tiny_config(chat_file, "train=lora", "train.lora.dropout=0.0", "loss.name=test_contracts_no_adapter")
    )
    loaded = load_model(config.model)
    model, tok = loaded.model, loaded.tokenizer
    dataset, batch = first_batch(config, tok)
    with torch.no_grad():  # the aligned model itself, before any adapter
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    base = token_logprobs(logits, batch["input_ids"])
    model = prepare_model(model, config.train)
    with torch.no_grad():  # an adapter that changes the model (LoRA starts as the identity)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    model.train()
    make_trainer(config, model, dataset, tmp_path / "out").compute_loss(model, batch)
    (inputs,) = calls
    mask = inputs.mask
    assert inputs.hidden_states is None and inputs.logits_at is None and inputs.config is None
    assert not inputs.no_adapter_logps.requires_grad
    torch.testing.assert_close(inputs.no_adapter_logps[mask], base[mask], atol=1e-5, rtol=0)
    assert (inputs.policy_logps[mask].detach() - base[mask]).abs().max() > 1e-3  # the adapter is on


def test_no_adapter_without_an_adapter_is_a_config_error(chat_file, isolated_losses, tmp_path):
    recording("test_contracts_no_adapter_full", needs=("no_adapter",))
    config = validate(tiny_config(chat_file, "loss.name=test_contracts_no_adapter_full"))
    model = load_model(config.model).model
    with pytest.raises(ConfigError, match="loss test_contracts_no_adapter_full needs no_adapter.*train=lora"):
        make_trainer(config, model, TokenDataset([]), tmp_path / "out")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["++loss.params.logits_at=[3]", "++loss.params.scale=2"], r"loss\.params\.scale: unknown key"),
        ([], r"loss\.params\.logits_at: loss test_contracts_settings needs a list of token ids"),
        (["++loss.params.logits_at=[3,-1]"], r"loss\.params\.logits_at: .* got \[3, -1\]"),
    ],
)
def test_typed_settings_name_the_key(chat_file, isolated_losses, overrides, message):
    recording("test_contracts_settings", needs=("logits_at",), config=RefusalTokens)
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(chat_file, "loss.name=test_contracts_settings", *overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["loss=kl_sft", "++loss.params.kl_cof=1"],
            r"^loss\.params\.kl_cof: unknown key; loss kl_sft has kl_coef",
        ),
        (["loss=kl_sft", "loss.params.kl_coef=-1"], r"^loss\.params\.kl_coef: must be a finite number >= 0"),
        (["loss.name=kl_sft"], r"^loss\.params\.kl_coef: loss kl_sft needs it"),
    ],
)
def test_kl_sft_settings_are_checked_at_validation(chat_file, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(chat_file, *overrides))
    assert validate(tiny_config(chat_file, "loss=kl_sft")).loss.params == {"kl_coef": 1.0}


def test_registration_rules(isolated_losses):
    with pytest.raises(PluginError, match="unknown needs"):
        register_loss("test_contracts_bad", needs=("logits",))
    with pytest.raises(PluginError, match="needs logits_at: its config needs a field logits_at"):
        register_loss("test_contracts_bad", needs=("logits_at",))
    with pytest.raises(PluginError, match="the five-argument signature gets no extra inputs"):

        @register_loss("test_contracts_bad", needs=("hidden_states",))
        def old(policy_logps, reference_logps, mask, n_tokens, params):
            return policy_logps.sum()

    @register_loss("test_contracts_old", needs_reference=True)
    def older(policy_logps, reference_logps, mask, n_tokens, params):
        return policy_logps.sum()

    spec = LOSSES.get("test_contracts_old", "loss.name")
    assert spec.legacy and spec.needs_reference and spec.needs == ("reference",)
    assert not LOSSES.get("sft", "loss.name").legacy
    assert LOSSES.get("constrained", "loss.name").needs == ("reference", "beta")
