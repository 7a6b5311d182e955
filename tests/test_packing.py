"""Sequence packing (`train.packing=true`): a micro-batch as one row without padding, sequences told apart by
their position ids. The loss and its gradients equal the padded batch's, for every registered loss; a model
whose attention crosses packed sequences is refused."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch
from test_training import reference_for, tiny_config, write_chats

from deepalign import cli
from deepalign.chat import encode_for_training
from deepalign.config import validate
from deepalign.data import build_mixture
from deepalign.losses.forward import unpack
from deepalign.models import load_model
from deepalign.training import IGNORE, AlignmentTrainer, Collator, TokenDataset, training_arguments

FEATURES = [
    {
        "input_ids": [5, 6, 7],
        "labels_mask": [False, True, True],
        "reference_logps": torch.tensor([0, -1, -2.0]),
    },
    {"input_ids": [8, 9], "labels_mask": [False, True], "reference_logps": torch.tensor([0, -3.0])},
]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl")


def test_the_packed_batch_is_one_row_with_restarting_positions():
    batch = Collator(0, packing=True)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert batch["seq_lengths"].tolist() == [3, 2]
    assert batch["attention_mask"].tolist() == [[1] * 5]  # counts tokens only; not given to the model
    assert batch["reference_logps"].tolist() == [[0, -1, -2, 0, -3]]
    padded = Collator(0)(FEATURES)
    assert unpack(batch["input_ids"], batch["seq_lengths"]).tolist() == padded["input_ids"].tolist()
    assert unpack(batch["labels"], batch["seq_lengths"], IGNORE).tolist() == padded["labels"].tolist()
    assert (
        unpack(batch["reference_logps"], batch["seq_lengths"]).tolist() == padded["reference_logps"].tolist()
    )


def step_gradients(config, packing: bool, chunk_mib: float = 256):
    """Loss and gradients of one step over 4 examples through AlignmentTrainer.compute_loss."""
    loaded = load_model(config.model)
    model, tok = loaded.model, loaded.tokenizer
    examples, _ = build_mixture(config.data, tok)
    encoded = [encode_for_training(tok, e.prompt, e.response, max_length=64) for e in examples[:4]]
    assert len({len(e.input_ids) for e in encoded}) > 1  # the padded batch does pad
    needs_reference = config.loss.name != "sft"
    dataset = TokenDataset(encoded, reference_for(model, encoded, tok) if needs_reference else None)
    trainer = AlignmentTrainer(
        model=model,
        args=training_arguments(config.train, Path(tempfile.mkdtemp(prefix="deepalign-test-"))),
        train_dataset=dataset,
        data_collator=Collator(tok.pad_token_id, packing=packing),
        loss_config=config.loss,
        logprob_chunk_mib=chunk_mib,
    )
    batch = Collator(tok.pad_token_id, packing=packing)([dataset[i] for i in range(4)])
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return float(loss.detach()), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("loss", ["sft", "constrained", "kl_sft"])
def test_packed_loss_and_gradients_equal_the_padded_ones(chat_file, loss):
    config = validate(tiny_config(chat_file, f"loss={loss}"))
    padded_loss, padded_grads = step_gradients(config, packing=False)
    packed_loss, packed_grads = step_gradients(config, packing=True)
    full_loss, _ = step_gradients(config, packing=True, chunk_mib=0)  # the model's full logits, packed
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    assert full_loss == pytest.approx(padded_loss, abs=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 5
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


class DropsPositions(torch.nn.Module):
    """A wrapper whose forward loses the position ids: the attention then runs across packed sequences."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, position_ids=None, **kwargs):
        return self.module(**kwargs)


def test_a_model_whose_attention_crosses_packed_sequences_is_refused(chat_file):
    config = validate(tiny_config(chat_file, "loss=sft"))
    loaded = load_model(config.model)
    tok = loaded.tokenizer
    examples, _ = build_mixture(config.data, tok)
    encoded = [encode_for_training(tok, e.prompt, e.response, max_length=64) for e in examples[:4]]
    trainer = AlignmentTrainer(
        model=loaded.model,
        args=training_arguments(config.train, Path(tempfile.mkdtemp(prefix="deepalign-test-"))),
        train_dataset=TokenDataset(encoded),
        data_collator=Collator(tok.pad_token_id, packing=True),
        loss_config=config.loss,
    )
    batch = Collator(tok.pad_token_id, packing=True)([TokenDataset(encoded)[i] for i in range(4)])
    with pytest.raises(ValueError, match="train.packing: packed sequences score"):
        trainer.compute_loss(DropsPositions(loaded.model), batch)
    trainer.compute_loss(loaded.model, batch)  # the model itself keeps them apart


def test_a_packed_training_run_logs_the_padded_runs_losses(chat_file, tmp_path):
    """End to end through the train stage: 2 steps of the constrained loss, packed and padded."""
    losses = {}
    for packing in (False, True):
        cfg = tiny_config(
            chat_file,
            "loss=constrained",
            "train.max_steps=2",
            f"train.packing={packing}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        )
        cli.run(cfg, tmp_path / f"run-{packing}")
        log = (tmp_path / f"run-{packing}" / "train_log.jsonl").read_text().splitlines()
        losses[packing] = [json.loads(line)["train/loss"] for line in log if "train/loss" in json.loads(line)]
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_packing_and_the_chunk_size_are_validated(chat_file):
    with pytest.raises(Exception, match="train.logprob_chunk_mib"):
        validate(tiny_config(chat_file, "train.logprob_chunk_mib=-1"))
    assert dataclasses.asdict(validate(tiny_config(chat_file, "train.packing=true")).train)["packing"] is True
