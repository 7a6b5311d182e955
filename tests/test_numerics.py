"""Training numbers to trust: a NaN run stops, a corrupt reference cache heals, the token share alpha counts
the examples trained on, a resumed run's log keeps every step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from test_training import tiny_config, write_chats, write_triplets

from deepalign import cli
from deepalign.chat import NoLabelError, encode_for_training
from deepalign.config import validate
from deepalign.data import build_mixture
from deepalign.models import load_model
from deepalign.reference import cached_reference_logps, compute_reference_logps, model_fingerprint
from deepalign.training import (
    AlignmentTrainer,
    Collator,
    NonFiniteError,
    TokenDataset,
    TrackerCallback,
    training_arguments,
)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl")


def test_a_loss_that_turns_nan_stops_training_naming_the_step(chat_file, tmp_path):
    """lr 1e10: step 1 is finite, step 2's loss is NaN. The run fails there (logging every 4 steps, which
    would average the NaN away) and saves no model."""
    cfg = tiny_config(
        chat_file,
        "train.optimizer.lr=1e10",
        "train.max_steps=4",
        "train.logging_steps=4",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    with pytest.raises(NonFiniteError, match=r"^training: the loss is nan at step 2; lower train\.optimizer"):
        cli.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "run" / "stages.json").exists()


def test_a_non_finite_gradient_stops_before_the_optimizer_step(chat_file, tmp_path):
    config = validate(tiny_config(chat_file))
    loaded = load_model(config.model)
    model, tok = loaded.model, loaded.tokenizer
    examples, _ = build_mixture(config.data, tok)
    encoded = [encode_for_training(tok, e.prompt, e.response, max_length=64) for e in examples]
    trainer = AlignmentTrainer(
        model=model,
        args=training_arguments(config.train, tmp_path / "out"),
        train_dataset=TokenDataset(encoded),
        data_collator=Collator(tok.pad_token_id),
        loss_config=config.loss,
    )
    weight = model.model.norm.weight
    before = weight.detach().clone()
    weight.register_hook(lambda g: g * float("inf"))  # the loss stays finite
    with pytest.raises(NonFiniteError, match=r"non-finite gradient \(of model\.norm\.weight\) at step 1"):
        trainer.train()
    torch.testing.assert_close(weight.detach(), before, atol=0, rtol=0)


def _encoded(chat_file):
    config = validate(tiny_config(chat_file))
    loaded = load_model(config.model)
    examples, _ = build_mixture(config.data, loaded.tokenizer)
    encoded = [encode_for_training(loaded.tokenizer, e.prompt, e.response, max_length=64) for e in examples]
    return loaded, encoded, model_fingerprint(config.model, loaded.source, loaded.model)


@pytest.mark.parametrize("damage", ["garbage", "wrong-length", "wrong-count", "nan", "pickled-object"])
def test_a_corrupt_reference_cache_is_recomputed_and_overwritten(chat_file, tmp_path, caplog, damage):
    loaded, encoded, key = _encoded(chat_file)
    pad = loaded.tokenizer.pad_token_id
    fresh = compute_reference_logps(loaded.model, encoded, pad)
    _, path, _ = cached_reference_logps(loaded.model, encoded, pad, tmp_path, key)
    if damage == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif damage == "wrong-length":
        torch.save([t[:-1] for t in fresh], path)
    elif damage == "wrong-count":
        torch.save(fresh[:-1], path)
    elif damage == "nan":
        torch.save([t * float("nan") for t in fresh], path)
    else:
        torch.save({"logps": fresh, "callback": logging.getLogger}, path)  # refused by weights_only
    with caplog.at_level(logging.WARNING, logger="deepalign.reference"):
        logps, path2, hit = cached_reference_logps(loaded.model, encoded, pad, tmp_path, key)
    assert not hit and path2 == path
    assert str(path) in caplog.text and "recomputing" in caplog.text
    assert len(logps) == len(fresh)
    for a, b in zip(logps, fresh):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    again, _, hit = cached_reference_logps(loaded.model, encoded, pad, tmp_path, key)  # healed on disk
    assert hit
    for a, b in zip(again, fresh):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_alpha_tokens_counts_the_target_tokens_of_the_examples_kept(tmp_path):
    """One utility example is too long and dropped: the safety share of target tokens is over those left."""
    triplets = write_triplets(tmp_path / "triplets.jsonl", 4)
    chats = write_chats(tmp_path / "chats.jsonl", 8)
    rows = chats.read_text().splitlines()
    rows[0] = json.dumps({"prompt": "word " * 120, "response": "alpha beta"})
    chats.write_text("\n".join(rows) + "\n")
    cfg = compose_config(
        [
            "model=tiny",
            "logger=none",
            "stages=[train]",
            "data=safety_sft",
            "data.max_length=64",
            f"data.components.safety.source={triplets}",
            f"data.components.utility.source={chats}",
            "data.safety_share=null",
            "train.max_steps=1",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    config = validate(cfg)
    tok = load_model(config.model).tokenizer
    examples, _ = build_mixture(config.data, tok)
    kept = []
    for e in examples:
        try:
            kept.append(
                (e.component, sum(encode_for_training(tok, e.prompt, e.response, max_length=64).labels_mask))
            )
        except NoLabelError:
            continue
    assert len(kept) == len(examples) - 1
    expected = sum(n for c, n in kept if c == "safety") / sum(n for _, n in kept)
    misaligned = sum(n for (_, n), e in zip(kept, examples) if e.component == "safety") / sum(
        n for _, n in kept
    )
    assert round(misaligned, 4) != round(expected, 4)  # pairing counts with all examples gives another number
    metrics = cli.run(cfg, tmp_path / "run")
    assert metrics["data/dropped_too_long"] == 1
    assert metrics["data/alpha_tokens"] == round(expected, 4)


def _rows(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]  # the steps (not the end-of-run summary)


def test_a_resumed_run_logs_every_step_once_with_the_values_of_a_straight_run(
    chat_file, tmp_path, monkeypatch
):
    base = [
        "loss=constrained",
        "train.max_steps=6",
        "train.save_steps=2",
        f"paths.cache_dir={tmp_path / 'c'}",
    ]
    straight = cli.run(tiny_config(chat_file, *base), tmp_path / "straight")

    def stop(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise KeyboardInterrupt  # after checkpoint-4 is written

    monkeypatch.setattr(TrackerCallback, "on_save", stop, raising=False)
    with pytest.raises(KeyboardInterrupt):
        cli.run(tiny_config(chat_file, *base), tmp_path / "resumed")
    monkeypatch.undo()
    resumed = cli.run(tiny_config(chat_file, *base), tmp_path / "resumed")
    assert resumed["train/resumed_from_step"] == 4
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert (
        [r.keys() for r in a] == [r.keys() for r in b]
        and "train/nll" in b[0]
        and "train/weight/pos=1" in b[0]
    )
    for ra, rb in zip(a, b):
        for k in (k for k in ra if not k.endswith(("_runtime", "_per_second"))):  # timings differ
            assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
    for k in ("train/mean_loss", "train/first_loss", "train/last_loss", "train/first_nll", "train/last_nll"):
        assert resumed[k] == pytest.approx(straight[k], abs=1e-5), k
    # the train stage run again on the finished checkpoints (loaded, not retrained) keeps the log too
    (tmp_path / "resumed" / "stages.json").unlink()
    again = cli.run(tiny_config(chat_file, *base), tmp_path / "resumed")
    assert again["train/resumed_from_step"] == 6
    assert [r["step"] for r in _rows(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    assert again["train/mean_loss"] == pytest.approx(straight["train/mean_loss"], abs=1e-5)
