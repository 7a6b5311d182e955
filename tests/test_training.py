"""Training on the tiny model: loss normalisation, the constrained loss at initialisation, reference cache,
recovery examples, resume after SIGKILL, LoRA and DeepSpeed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from safetensors.torch import load_file

from deepalign import cli
from deepalign.chat import encode_for_training
from deepalign.config import validate
from deepalign.data import build_mixture
from deepalign.losses import beta_schedule
from deepalign.models import load_model
from deepalign.reference import cached_reference_logps, model_fingerprint
from deepalign.training import AlignmentTrainer, Collator, TokenDataset, training_arguments

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def write_chats(path: Path, n: int = 16) -> Path:
    rows = [
        {"prompt": f"Question {i}: list some words.", "response": " ".join(WORDS[i % 5 : i % 5 + 4 + i % 7])}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_triplets(path: Path, n: int = 12) -> Path:
    rows = [
        {
            "prompt": f"Request number {i}, please comply.",
            "harmful": "Sure, here is " + " ".join(WORDS[: 6 + i % 9]) + ".",
            "refusal": "I'm sorry, but I cannot help with that request.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl")


def tiny_overrides(chat_file: Path) -> list[str]:
    """Training the tiny model on `chat_file`: the command-line overrides the training tests share."""
    return [
        "model=tiny",
        "logger=none",
        "stages=[train]",
        "data=chat_file",
        f"data.components.chat.source={chat_file}",
        "data.max_length=64",
        "train.per_device_batch_size=4",
        "train.optimizer.lr=1e-3",
    ]


def tiny_config(chat_file: Path, *overrides: str):
    return compose_config([*tiny_overrides(chat_file), *overrides])


def micro_batch_gradients(
    config, batch_size: int, accumulation: int, reference=None, loss_kwargs: bool | None = None
):
    """Loss and gradients of one optimizer step over the first 4 examples, through the Trainer's own path.

    `loss_kwargs=False`: as for a model whose forward takes no loss kwargs (the Trainer counts no tokens)."""
    loaded = load_model(config.model)
    model, tok = loaded.model, loaded.tokenizer
    examples, _ = build_mixture(config.data, tok)
    encoded = [encode_for_training(tok, e.prompt, e.response, max_length=64) for e in examples[:4]]
    train_cfg = dataclasses.replace(
        config.train, per_device_batch_size=batch_size, gradient_accumulation_steps=accumulation
    )
    dataset = TokenDataset(encoded, reference(model, encoded, tok) if reference else None)
    trainer = AlignmentTrainer(
        model=model,
        args=training_arguments(train_cfg, Path(tempfile.mkdtemp(prefix="deepalign-test-"))),
        train_dataset=dataset,
        data_collator=Collator(tok.pad_token_id),
        loss_config=config.loss,
    )
    if loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = loss_kwargs
    collate = Collator(tok.pad_token_id)
    batches = [collate([dataset[i] for i in range(j, j + batch_size)]) for j in range(0, 4, batch_size)]
    _, n_items = trainer.get_batch_samples(iter(batches), len(batches), torch.device("cpu"))
    assert n_items is not None
    trainer.current_gradient_accumulation_steps = len(batches)
    model.train()
    total = 0.0
    for batch in batches:
        total += float(trainer.training_step(model, batch, n_items))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def reference_for(model, encoded, tok):
    from deepalign.reference import compute_reference_logps

    return compute_reference_logps(model, encoded, tok.pad_token_id)


@pytest.mark.parametrize("loss_kwargs", [None, False], ids=["trainer-counts", "trainer-counts-none"])
@pytest.mark.parametrize("loss", ["sft", "constrained"])
def test_batch4_equals_batch2_times_accumulation2(chat_file, loss, loss_kwargs):
    """Batch 4 = batch 2 x accumulation 2 = batch 1 x accumulation 4, also for models whose forward takes no
    loss kwargs (the Trainer then passes no token count)."""
    config = validate(tiny_config(chat_file, f"loss={loss}"))
    ref = reference_for if loss == "constrained" else None
    loss_a, grads_a = micro_batch_gradients(config, 4, 1, ref, loss_kwargs)
    for batch_size, accumulation in ((2, 2), (1, 4)):
        loss_b, grads_b = micro_batch_gradients(config, batch_size, accumulation, ref, loss_kwargs)
        assert math.isclose(loss_a, loss_b, rel_tol=0, abs_tol=1e-5)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=0, msg=name)


def test_constrained_loss_at_initialisation_is_two_over_beta_log_two(chat_file, tmp_path):
    """policy == reference at step 0: every token contributes (2 / beta_t) log 2 to the logged objective."""
    cfg = tiny_config(
        chat_file,
        "loss=constrained",
        "train.max_steps=1",
        "train.per_device_batch_size=16",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    metrics = cli.run(cfg, tmp_path / "run")
    config = validate(cfg)
    loaded = load_model(config.model)
    examples, _ = build_mixture(config.data, loaded.tokenizer)
    betas = beta_schedule(64)
    per_token = []
    for e in examples:
        n = sum(encode_for_training(loaded.tokenizer, e.prompt, e.response, max_length=64).labels_mask)
        per_token += [2 / float(b) * math.log(2) for b in betas[:n]]
    assert metrics["train/first_loss"] == pytest.approx(sum(per_token) / len(per_token), abs=1e-4)
    assert metrics["train/reference_cache_hit"] == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["train/weight/pos=1"] == pytest.approx(1.0, abs=1e-6)
    # beside its own objective the run logs the plain NLL of the batch: at step 0 the initial model's
    encoded = [encode_for_training(loaded.tokenizer, e.prompt, e.response, max_length=64) for e in examples]
    logps = reference_for(loaded.model, encoded, loaded.tokenizer)
    nll = [-float(lp[i]) for e, lp in zip(encoded, logps) for i, m in enumerate(e.labels_mask) if m]
    assert metrics["train/first_nll"] == pytest.approx(sum(nll) / len(nll), abs=1e-4)
    assert metrics["train/first_nll"] != pytest.approx(metrics["train/first_loss"], abs=1e-2)


def test_reference_cache_is_hit_without_a_forward_pass(chat_file, tmp_path):
    config = validate(tiny_config(chat_file))
    loaded = load_model(config.model)
    examples, _ = build_mixture(config.data, loaded.tokenizer)
    encoded = [encode_for_training(loaded.tokenizer, e.prompt, e.response) for e in examples]
    key = model_fingerprint(config.model, loaded.source, loaded.model)
    first, path, hit = cached_reference_logps(
        loaded.model, encoded, loaded.tokenizer.pad_token_id, tmp_path, key
    )
    assert not hit and path.is_file()

    def no_forward(*args, **kwargs):
        raise AssertionError("the reference cache was not used")

    loaded.model.forward = no_forward
    second, path2, hit2 = cached_reference_logps(
        loaded.model, encoded, loaded.tokenizer.pad_token_id, tmp_path, key
    )
    assert hit2 and path2 == path
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    # Another training set (another max length) is another key.
    shorter = [encode_for_training(loaded.tokenizer, e.prompt, e.response, max_length=40) for e in examples]
    del loaded.model.forward  # the class's forward again
    _, path3, hit3 = cached_reference_logps(
        loaded.model, shorter, loaded.tokenizer.pad_token_id, tmp_path, key
    )
    assert not hit3 and path3 != path


def test_recovery_examples_label_exactly_the_refusal_after_k_prefilled_tokens(tmp_path, smollm2_tokenizer):
    triplets = write_triplets(tmp_path / "triplets.jsonl", 40)
    config = validate(
        compose_config(
            [
                "model=tiny",
                "logger=none",
                "data=safety_recovery",
                f"data.components.safety.source={triplets}",
                f"data.components.utility.source={write_chats(tmp_path / 'chats.jsonl')}",
                "data.safety_share=0.5",
                "data.size=200",
            ]
        )
    )
    tok = smollm2_tokenizer
    examples, stats = build_mixture(config.data, tok)
    recovery = [e for e in examples if e.component == "safety"]
    assert 0.3 < stats["data/recovery/share_k0"] < 0.7 and stats["data/alpha"] == 0.5
    assert any(e.k > 0 for e in recovery) and any(e.k == 0 for e in recovery)
    for e in recovery:
        enc = encode_for_training(tok, e.prompt, e.response, prefill=e.prefill)
        first_label = enc.labels_mask.index(True)
        assert first_label - enc.prompt_length == e.k, (e.k, e.prefill)
        labelled = tok.decode([t for t, m in zip(enc.input_ids, enc.labels_mask) if m])
        assert labelled.strip() == "I'm sorry, but I cannot help with that request.<|im_end|>"
    again, _ = build_mixture(config.data, tok)
    assert [e.k for e in again] == [e.k for e in examples], "the recovery sampler must be seeded"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(chat_file: Path, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "deepalign"),
        *tiny_overrides(chat_file),
        "train.per_device_batch_size=2",  # overrides the shared 4 (the last value wins)
        "train.max_steps=8",
        "train.save_steps=2",
        "loss=constrained",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def test_sigkill_after_a_checkpoint_then_rerun_gives_the_same_weights(chat_file, tmp_path):
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(chat_file, straight, cache), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(chat_file, killed, cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    done = killed / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    while not done.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    out = subprocess.run(_train_cmd(chat_file, killed, cache), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["train/resumed_from_step"] >= 4 and metrics["train/steps"] == 8
    assert metrics["train/reference_cache_hit"] == 1
    a, b = _weights(straight / "model"), _weights(killed / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def test_lora_training_saves_adapter_and_merged_model(chat_file, tmp_path):
    cfg = tiny_config(
        chat_file,
        "train=lora",
        "stages=[train,probe]",
        "train.max_steps=6",
        "train.optimizer.lr=1e-2",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    metrics = cli.run(cfg, tmp_path / "run")
    assert metrics["train/last_loss"] < metrics["train/first_loss"]
    assert metrics["probe/target_tokens"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    # the merged model is the base model plus the trained adapter: the same logits as base + adapter (PEFT)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_model(validate(cfg).model).model
    ids = torch.tensor([[1, 17, 99, 256, 3000, 42, 7]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
        adapted = peft(input_ids=ids).logits
        merged = (
            AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model")).eval()(input_ids=ids).logits
        )
    assert (adapted - base_logits).abs().max() > 1e-3, "the adapter learned nothing"
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_single_process_on_cpu_trains_then_evaluates(chat_file, tmp_path, stage):
    """ZeRO-2 / ZeRO-3 through the Trainer (gloo, one process); the probe stage then loads the saved model."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    cmd = _train_cmd(
        chat_file,
        tmp_path / "run",
        tmp_path / "cache",
        f"train.deepspeed={stage}",
        "train.optimizer.lr=5e-3",
        "loss=sft",
        "stages=[train,probe]",
    )
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train/last_loss"] < metrics["train/first_loss"]
    assert metrics["probe/target_tokens"] > 0


def test_bf16_training_gets_a_bf16_reference_so_weights_start_at_one(chat_file, tmp_path):
    """train.bf16: the reference pass runs under the same autocast as training (its own cache entry), so
    policy == reference at step 0 and the token weights start at 1, not at bf16 noise."""
    cfg = tiny_config(
        chat_file,
        "loss=constrained",
        "train.max_steps=1",
        "train.bf16=true",
        "train.per_device_batch_size=16",
        "+model.arch.initializer_range=0.3",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    cli.run(cfg, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    for pos in range(1, 6):
        assert log[0][f"train/weight/pos={pos}"] == pytest.approx(1.0, abs=1e-2), pos
    assert [p.name.endswith("-bfloat16.pt") for p in (tmp_path / "cache" / "reference").glob("*.pt")] == [
        True
    ]


def test_checkpoints_resume_only_under_the_same_training_settings(chat_file, tmp_path):
    """A changed evaluation setting skips `train` (its fingerprint covers only what the weights depend on);
    a train stage redone under the same settings resumes from its last checkpoint (same weights, no step
    redone); a changed training setting starts afresh, the old checkpoints moved aside."""
    base = ["train.max_steps=2", "train.save_steps=2", f"paths.cache_dir={tmp_path / 'cache'}"]
    run_dir = tmp_path / "run"
    first = cli.run(tiny_config(chat_file, *base), run_dir)
    assert first["train/resumed_from_step"] == 0
    weights = load_file(run_dir / "model" / "model.safetensors")
    saved = (run_dir / "model" / "model.safetensors").stat().st_mtime_ns
    cli.run(tiny_config(chat_file, *base, "probe.max_new_tokens=5"), run_dir)
    assert (run_dir / "model" / "model.safetensors").stat().st_mtime_ns == saved  # not trained again
    (run_dir / "stages.json").unlink()  # forget that train finished: it reruns, from its checkpoint
    again = cli.run(tiny_config(chat_file, *base, "probe.max_new_tokens=5"), run_dir)
    assert again["train/resumed_from_step"] == 2
    resumed = load_file(run_dir / "model" / "model.safetensors")
    assert resumed.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed[name], tensor, atol=0, rtol=0, msg=name)
    other = cli.run(tiny_config(chat_file, *base, "train.optimizer.lr=5e-4"), run_dir)
    assert other["train/resumed_from_step"] == 0
    assert list(tmp_path.glob("run/checkpoints-*/checkpoint-2"))


def test_no_final_checkpoint_keeps_the_last_multiple_of_save_steps(chat_file, tmp_path):
    """`train.final_checkpoint=false`: checkpoints at the multiples of save_steps only (none after the last
    step, where the Trainer would write one); the trained model is saved and equals a run that wrote it."""
    base = ["train.max_steps=3", "train.save_steps=2", f"paths.cache_dir={tmp_path / 'cache'}"]
    cli.run(tiny_config(chat_file, *base), tmp_path / "with")
    cli.run(tiny_config(chat_file, *base, "train.final_checkpoint=false"), tmp_path / "without")
    names = {p.name for p in (tmp_path / "with" / "checkpoints").glob("checkpoint-*")}
    assert names == {"checkpoint-2", "checkpoint-3"}
    assert [p.name for p in (tmp_path / "without" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    a = load_file(tmp_path / "with" / "model" / "model.safetensors")
    b = load_file(tmp_path / "without" / "model" / "model.safetensors")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, atol=0, rtol=0, msg=name)


def test_train_attention_serves_training_and_the_reference_but_is_not_saved(chat_file, tmp_path, monkeypatch):
    """`train.attn_implementation` is the attention of the training steps and of the reference pass (so they
    agree at step 0), names the reference cache, and stays out of the saved model."""
    import deepalign.reference as reference_module
    from deepalign.logprobs import unwrap
    from deepalign.models import trained_model

    seen: dict[str, set[str]] = {"train": set(), "reference": set()}
    compute_loss, compute_reference = AlignmentTrainer.compute_loss, reference_module.compute_reference_logps

    def spy_loss(self, model, *args, **kwargs):
        seen["train"].add(unwrap(model).config._attn_implementation)
        return compute_loss(self, model, *args, **kwargs)

    def spy_reference(model, *args, **kwargs):
        seen["reference"].add(model.config._attn_implementation)
        return compute_reference(model, *args, **kwargs)

    monkeypatch.setattr(AlignmentTrainer, "compute_loss", spy_loss)
    monkeypatch.setattr(reference_module, "compute_reference_logps", spy_reference)
    cfg = tiny_config(
        chat_file,
        "loss=constrained",
        "train.max_steps=1",
        "train.attn_implementation=eager",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    cli.run(cfg, tmp_path / "run")
    assert seen == {"train": {"eager"}, "reference": {"eager"}}
    saved = load_model(trained_model(validate(cfg).model, tmp_path / "run" / "model"))
    assert saved.model.config._attn_implementation == "sdpa"  # generation keeps the model's own
    # the reference cache is keyed by the attention it was computed with
    loaded = load_model(validate(cfg).model)
    sdpa = model_fingerprint(validate(cfg).model, loaded.source, loaded.model)
    loaded.model.set_attn_implementation("eager")
    assert model_fingerprint(validate(cfg).model, loaded.source, loaded.model) != sdpa
