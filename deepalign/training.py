"""Fine-tuning with the transformers Trainer: SFT or the token-wise constrained loss, LoRA, DeepSpeed, resume.

`AlignmentTrainer` overrides only `compute_loss`; the loop, optimizer, schedule, checkpointing, DeepSpeed
and resume are the Trainer's own.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from deepalign.chat import EncodedChat
from deepalign.config import LossConfig, TrainConfig
from deepalign.logprobs import LOGPROB_CHUNK_MIB, pad_batch
from deepalign.losses.forward import check_adapter, loss_inputs
from deepalign.losses.inputs import call_loss, loss_output
from deepalign.plugins import LOSSES
from deepalign.precision import train_bf16
from deepalign.storage.atomic import write_text_atomic

log = logging.getLogger(__name__)
IGNORE = -100
# transformers 5.x renamed TrainingArguments.gradient_checkpointing to activation_checkpointing (the old name
# stays as a deprecated alias where the new one exists; releases before the rename know only the old one)
CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)

# Releases before `Trainer.loss_is_scaled_for_ga` (5.0) divide the loss by the accumulation steps whenever the
# model's forward takes no loss kwargs; ours is already normalised over the whole optimizer step.
TRAINER_DIVIDES_BY_GA = "loss_is_scaled_for_ga" not in vars(Trainer)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient: the run stops instead of saving NaN weights."""


class FiniteGradientsCallback(TrainerCallback):
    """Before each optimizer step: every gradient is finite, else stop naming the step and a parameter.

    (Gradients that DeepSpeed keeps in its own partitions are not visible here; the loss check still is.)"""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        if not named:
            return
        # one fused pass over all gradients (an isfinite per tensor took a tenth of a 2-core CPU step)
        if bool(torch.isfinite(torch.nn.utils.get_total_norm([g for _, g in named]))):
            return
        bad = [n for n, g in named if not bool(torch.isfinite(g).all())]
        what = f"non-finite gradient (of {bad[0]})" if bad else "gradient norm beyond float range"
        raise NonFiniteError(
            f"training: {what} at step {state.global_step + 1}; lower train.optimizer.lr and check the data"
        )


class NoFinalCheckpoint(TrainerCallback):
    """`train.final_checkpoint=false`: no checkpoint after the last step (the Trainer writes one there
    whatever save_steps says; the train stage saves the trained model itself)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False
        return control


class TokenDataset(torch.utils.data.Dataset):
    """Tokenized examples, each with its cached reference log-probs when the loss needs them."""

    def __init__(self, encoded: list[EncodedChat], reference: list[torch.Tensor] | None = None):
        self.encoded, self.reference = encoded, reference

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.encoded[i]
        item: dict[str, Any] = {"input_ids": e.input_ids, "labels_mask": e.labels_mask}
        if self.reference is not None:
            item["reference_logps"] = self.reference[i]
        return item


@dataclass
class Collator:
    """Right-pads a batch; `labels` are the input ids on target tokens and -100 elsewhere.

    `packing`: the batch becomes one row without padding (transformers' `DataCollatorWithFlattening`:
    position ids restart at 0 for each sequence, which the attention reads as sequence boundaries), plus
    `seq_lengths` to cut it back into sequences and an all-ones attention mask used only to count tokens."""

    pad_id: int
    packing: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packing:
            return self.packed(features)
        padded = pad_batch(
            [f["input_ids"] for f in features], self.pad_id, labels_masks=[f["labels_mask"] for f in features]
        )
        ids = padded.input_ids
        batch = {
            "input_ids": ids,
            "attention_mask": padded.attention_mask,
            "labels": torch.where(padded.labels_mask, ids, torch.full_like(ids, IGNORE)),
        }
        if "reference_logps" in features[0]:
            width = ids.shape[1]
            ref = torch.zeros(len(features), width)
            for i, f in enumerate(features):
                ref[i, : len(f["reference_logps"])] = f["reference_logps"]
            batch["reference_logps"] = ref
        return batch

    def packed(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [
            {
                "input_ids": list(f["input_ids"]),
                "labels": [t if m else IGNORE for t, m in zip(f["input_ids"], f["labels_mask"])],
            }
            for f in features
        ]
        batch = DataCollatorWithFlattening(separator_id=IGNORE, return_tensors="pt")(rows)
        batch["seq_lengths"] = torch.tensor([len(f["input_ids"]) for f in features])
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if "reference_logps" in features[0]:
            batch["reference_logps"] = torch.cat([f["reference_logps"] for f in features]).unsqueeze(0)
        return batch


class AlignmentTrainer(Trainer):
    """A Trainer whose loss is the configured (registered) one, `loss.name`, normalised per target token.

    The loss is divided by the number of target tokens of the whole optimizer step (all micro-batches,
    all processes: `num_items_in_batch`, counted here when the Trainer does not count it), so gradient
    accumulation and data parallelism give the same gradient as one big batch. A non-finite loss or
    gradient stops training with a `NonFiniteError` naming the step.
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self, *args, loss_config: LossConfig, logprob_chunk_mib: float = LOGPROB_CHUNK_MIB, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.logprob_chunk_mib = logprob_chunk_mib  # train.logprob_chunk_mib
        self.packing_checked = False
        self.add_callback(FiniteGradientsCallback())
        self.loss_config = loss_config
        self.loss_spec = LOSSES.get(loss_config.name, "loss.name")
        self.loss_settings = self.loss_spec.settings(loss_config.params)  # its typed config, or None
        # `loss.params`; a five-argument loss finds the beta schedule there too
        self.loss_params = dict(loss_config.params)
        if self.loss_spec.legacy:
            self.loss_params["beta"] = loss_config.beta
        if "no_adapter" in self.loss_spec.needs:
            check_adapter(self.model, loss_config.name)
        self.loss_logs: dict[str, list[float]] = defaultdict(list)  # the loss's own logs since the last log
        # summed -log p of target tokens and their count since the last log (this process)
        self.nll = [0.0, 0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.loss_spec
        mask = inputs["labels"] != IGNORE
        # The output layer scores outside the model's forward: under the autocast accelerate puts on that
        # forward (train.bf16), as the reference pass does, so at step 0 policy and reference agree exactly.
        with self.accelerator.autocast():
            batch, outputs = loss_inputs(
                model,
                inputs,
                mask,
                needs=spec.needs,
                chunk_mib=self.logprob_chunk_mib,
                n_tokens=num_items_in_batch,
                config=self.loss_settings,
                beta=self.loss_config.beta,
                check_packed=not self.packing_checked,
            )
        self.packing_checked = self.packing_checked or "seq_lengths" in inputs
        policy, mask = batch.policy_logps, batch.mask
        # the plain NLL of the batch, logged beside any objective so SFT and constrained runs compare
        self.nll[0] -= float(policy.detach()[mask].sum())
        self.nll[1] += int(mask.sum())
        if spec.needs_reference and batch.reference_logps is None:
            raise ValueError(f"loss={self.loss_config.name} needs reference log-probs in the batch")
        needs_grad = model.training and torch.is_grad_enabled() and policy.requires_grad
        loss, logs = loss_output(spec, call_loss(spec, batch, self.loss_params), needs_grad=needs_grad)
        for name, value in logs.items():  # the loss's own diagnostics, averaged between logs
            self.loss_logs[name].append(float(value))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if TRAINER_DIVIDES_BY_GA and model.training and not self.model_accepts_loss_kwargs:
            loss = loss * self.current_gradient_accumulation_steps  # undone by that release's division
        if model.training and not torch.isfinite(loss.detach()):
            raise NonFiniteError(
                f"training: the loss is {float(loss.detach())} at step {self.state.global_step + 1}; lower "
                "train.optimizer.lr and check the data"
            )
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The micro-batches of one optimizer step and their target-token count.

        The Trainer counts the tokens only for models whose forward takes loss kwargs; for the others
        (and remote-code models) count them here, so the loss is still normalised over the whole step."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is None and batches and "labels" in batches[0]:
            num_items = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
            num_items = torch.tensor(num_items, device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_items = self.accelerator.gather(num_items).sum()
        return batches, num_items

    def pop_logs(self) -> dict[str, float]:
        """Since the last call: the NLL per target token (`train/nll`, on this process's batches) and the mean
        of each value the loss logs (constrained: the token weight w_t at response positions 1..10)."""
        out = {f"train/{name}": sum(v) / len(v) for name, v in self.loss_logs.items()}
        if self.nll[1]:
            out["train/nll"] = self.nll[0] / self.nll[1]
        self.loss_logs.clear()
        self.nll = [0.0, 0]
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs plus `pop_logs()`: in the log history, so checkpoints keep them too."""
        logs.update(self.pop_logs())
        super().log(logs, start_time)


def log_entry(logs: dict[str, Any], step: int) -> dict[str, float]:
    """A Trainer log (or log-history entry) as a `train_log.jsonl` row: numbers only, keys under `train/`."""
    values = {
        k if k.startswith("train/") else f"train/{k}": float(v)
        for k, v in logs.items()
        if isinstance(v, (int, float)) and k != "step"
    }
    return {"step": step, **values}


def mean_logged_loss(log_history: list[dict[str, Any]]) -> float:
    """The mean training loss per step from the logged losses (each the mean since the previous log)."""
    total, last = 0.0, 0
    for h in log_history:
        if "loss" in h:
            total += h["loss"] * (h["step"] - last)
            last = h["step"]
    return total / max(last, 1)


class TrackerCallback(TrainerCallback):
    """Sends the Trainer's logs (plus the plain NLL and the constraint's per-position weights) onward."""

    def __init__(self, tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        values = log_entry(logs, state.global_step)
        del values["step"]
        self.tracker.log(values, step=state.global_step)


class TokensAtStart(TrainerCallback):
    """The Trainer's non-padding input-token count when this call's training starts (after a resume: the
    checkpoint's), for the tokens this call trained."""

    def __init__(self) -> None:
        self.tokens: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens = int(state.num_input_tokens_seen)


def deepspeed_config(name: str | None) -> str | None:
    """`zero2` / `zero3` name the packaged configs in launchers/; anything else is a path to a JSON file."""
    if name in ("zero2", "zero3"):
        return str(resources.files("deepalign.launchers").joinpath(f"{name}.json"))
    if name is not None and not Path(name).is_file():
        raise FileNotFoundError(f"train.deepspeed: no such file {name!r} (or use zero2 / zero3)")
    return name


def training_arguments(cfg: TrainConfig, output_dir: Path) -> TrainingArguments:
    """TrainingArguments with every optimizer and schedule setting taken from the config."""
    opt = cfg.optimizer
    return TrainingArguments(
        output_dir=str(output_dir),
        optim="adamw_torch_fused",  # one kernel per step (CUDA and CPU; on 2 CPU cores 10% less per step)
        learning_rate=opt.lr,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        adam_epsilon=opt.eps,
        weight_decay=opt.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        bf16=train_bf16(cfg.bf16, "cuda" if torch.cuda.is_available() else "cpu"),  # true | false | auto
        include_num_input_tokens_seen="non_padding",  # for the train stage's tokens/s
        **{CHECKPOINTING_ARG: cfg.gradient_checkpointing},
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed_config(cfg.deepspeed),
        dataloader_num_workers=0,
    )


def prepare_model(model, cfg: TrainConfig):
    """Freeze what the config freezes, wrap in LoRA (PEFT) for `train=lora`."""
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    return model


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint whose trainer state (the Trainer writes it last) is complete JSON.

    A run killed while writing a checkpoint leaves a partial folder; resume from the one before it.
    """
    if not output_dir.is_dir():
        return None
    folders = [p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("ignoring incomplete checkpoint %s", folder)
            continue
        return str(folder)
    return None


def fresh_checkpoints(folder: Path, fingerprint: str) -> None:
    """Keep `folder` for resuming only a run of this very config: checkpoints written under another config
    (and inputs) are moved aside to `<folder>-<their fingerprint>`, neither resumed nor deleted."""
    marker = folder / "fingerprint.txt"
    old = marker.read_text().strip() if marker.is_file() else None
    if old == fingerprint:
        return
    if folder.is_dir() and any(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        aside = folder.with_name(f"{folder.name}-{old or 'unknown'}")
        log.warning("checkpoints of another config moved to %s; training starts afresh", aside)
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, fingerprint + "\n")


def train(
    model,
    tokenizer,
    dataset: TokenDataset,
    cfg: TrainConfig,
    loss: LossConfig,
    output_dir: Path,
    tracker,
    fingerprint: str | None = None,
) -> tuple[Any, dict[str, float], list[dict[str, float]]]:
    """Train, resuming from the last checkpoint in `output_dir` (with `fingerprint`, only if written under
    the same one); return trainer, metrics, log history."""
    model = prepare_model(model, cfg)
    model.train()
    args = training_arguments(cfg, output_dir)
    if fingerprint is not None:
        with args.main_process_first(local=False, desc="checkpoint folder"):  # the others wait for it
            if args.process_index == 0:
                fresh_checkpoints(output_dir, fingerprint)
    trainer = AlignmentTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(tokenizer.pad_token_id, packing=cfg.packing),
        processing_class=tokenizer,
        callbacks=[TrackerCallback(tracker), TokensAtStart()]
        + ([] if cfg.final_checkpoint else [NoFinalCheckpoint()]),
        loss_config=loss,
        logprob_chunk_mib=cfg.logprob_chunk_mib,
    )
    last = last_complete_checkpoint(output_dir)
    state = json.loads((Path(last) / "trainer_state.json").read_text()) if last else {}
    resumed = int(state.get("global_step", 0))
    if last and 0 < int(state.get("max_steps", 0)) <= resumed:
        # Finished already: load it. (Resuming at the very end, the transformers 5 Trainer trains one step
        # more, which would change the weights of a run that only re-evaluates.)
        log.info("training already finished in %s; loading it", last)
        trainer._load_from_checkpoint(last)
        history, steps = state.get("log_history", []), resumed
        mean_loss = mean_logged_loss(history)
    else:
        if last:
            log.info("resuming from %s", last)
        result = trainer.train(resume_from_checkpoint=last)
        # a resumed run's log history holds the checkpoint's steps too; its training_loss only the new ones
        history, steps = trainer.state.log_history, int(result.global_step)
        mean_loss = mean_logged_loss(history) if last else float(result.training_loss)
    metrics = {
        "train/mean_loss": round(mean_loss, 6),
        "train/steps": steps,
        "train/resumed_from_step": resumed,
    }
    trainer.model.eval()
    return trainer, metrics, [log_entry(h, h["step"]) for h in history]
