"""The `safelora` stage: Safe LoRA (Hsu et al. 2024), a defence applied to a fine-tuned model.

For each selected weight matrix W ([out, in]) the alignment direction V = W_aligned - W_unaligned gives the
paper's projection C = V V^T / ||V||_F. As the paper defines it, C is not an orthogonal projector: it keeps
the part of an update in the column space of V, scaled by the squared singular values of V over ||V||_F. The
fine-tuning update dW = W_ft - W_aligned is projected, dW' = C dW; where the cosine similarity
s = <dW, dW'>_F / (||dW||_F ||dW'||_F) is below `safelora.threshold` (the update strays from the alignment
direction) the layer becomes W_aligned + dW', else it keeps W_ft. C is positive semi-definite, so s is in
[0, 1]; where dW' = 0 (V = 0, or an update orthogonal to V) s counts as 0 and the layer returns to W_aligned.

The paper projects LoRA updates (dW = B A); here dW is any update, a merged LoRA one or a full fine-tune. The
aligned and unaligned models are held on the CPU in the fine-tuned model's dtype; each layer is computed in
float32 on the fine-tuned model's device, one at a time. The result is saved to `<run_dir>/safelora/model`,
which the later stages of the run load (the attack stage then evaluates the defended model). Writes
`safelora/layers.json`; metrics `safelora/...`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from deepalign.config import ConfigError, ModelConfig, check
from deepalign.context import RunContext
from deepalign.models import DTYPES, check_model_folder, load_model
from deepalign.plugins import register_stage
from deepalign.storage.atomic import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class SafeLoRAConfig:
    """The `safelora` stage: the models that define the alignment direction, and which layers to project."""

    unaligned: str | None = None  # the base model before alignment: hub id or folder (required)
    aligned: str | None = None  # the aligned model the fine-tuning started from; None: the run's `model`
    threshold: float = 0.5  # layers whose update has a similarity below it are projected
    modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # name suffixes of the weights

    def check(self, key: str = "safelora") -> None:
        check(
            bool(self.unaligned),
            f"{key}.unaligned",
            f"the base model before alignment is required: {key}.unaligned=HUB_ID_OR_FOLDER",
        )
        check(0 <= self.threshold <= 1, f"{key}.threshold", f"must be in [0, 1], got {self.threshold}")
        check(bool(self.modules), f"{key}.modules", "name at least one linear layer, e.g. [q_proj, v_proj]")
        for i, name in enumerate(self.modules):
            check(bool(name), f"{key}.modules[{i}]", "an empty name")
        check_model_folder(f"{key}.unaligned", self.unaligned)  # a local folder exists, with weights
        if self.aligned:
            check_model_folder(f"{key}.aligned", self.aligned)


def safelora_projection(v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """dW' = C dW with the paper's C = V V^T / ||V||_F (zero where V = 0), multiplied in the cheaper order."""
    norm = torch.linalg.matrix_norm(v)  # Frobenius
    if norm == 0:
        return torch.zeros_like(delta)
    if v.shape[0] <= v.shape[1]:  # C is [out, out]: small enough to form
        return (v @ v.T) @ delta / norm
    return v @ (v.T @ delta) / norm


def similarity(delta: torch.Tensor, projected: torch.Tensor) -> float:
    """The cosine similarity <dW, dW'>_F / (||dW||_F ||dW'||_F); 0 where either is zero."""
    scale = torch.linalg.matrix_norm(delta) * torch.linalg.matrix_norm(projected)
    if scale == 0:
        return 0.0
    return float((delta * projected).sum() / scale)


@torch.no_grad()
def safelora_weight(
    w_ft: torch.Tensor,
    w_aligned: torch.Tensor,
    w_unaligned: torch.Tensor,
    threshold: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float, bool]:
    """One layer: (the new weight in w_ft's dtype, its similarity s, whether it was projected). Computed in
    `dtype` on w_ft's device."""
    aligned = w_aligned.to(w_ft.device, dtype)
    delta = w_ft.to(dtype) - aligned
    projected = safelora_projection(aligned - w_unaligned.to(w_ft.device, dtype), delta)
    s = similarity(delta, projected)
    if s < threshold:
        return (aligned + projected).to(w_ft.dtype), s, True
    return w_ft, s, False


def selected_weights(model: torch.nn.Module, modules: list[str]) -> dict[str, torch.nn.Parameter]:
    """The 2-D weights whose module name ends with one of `modules` (q_proj: `...self_attn.q_proj.weight`)."""
    suffixes = [f"{m}.weight" for m in modules]
    return {
        name: p
        for name, p in model.named_parameters()
        if p.ndim == 2 and any(name == s or name.endswith(f".{s}") for s in suffixes)
    }


def check_same_architecture(model: torch.nn.Module, others: dict[str, torch.nn.Module]) -> None:
    """The fine-tuned model and each of `others` (config key -> model) have the same parameter names and
    shapes; a ConfigError naming the key and the first difference otherwise."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for key, other in others.items():
        theirs = {name: tuple(p.shape) for name, p in other.named_parameters()}
        missing, extra = sorted(shapes.keys() - theirs.keys()), sorted(theirs.keys() - shapes.keys())
        differ = [n for n in shapes if n in theirs and shapes[n] != theirs[n]]
        if missing or extra or differ:
            if differ:
                what = f"{differ[0]} is {list(theirs[differ[0]])} there, {list(shapes[differ[0]])} here"
            else:
                what = f"{'it lacks' if missing else 'it has an extra'} {(missing or extra)[0]}"
            raise ConfigError(
                f"{key}: not the fine-tuned model's architecture ({what}; {len(missing)} missing, "
                f"{len(extra)} extra, {len(differ)} of other shapes): the three models must share the "
                "architecture and parameter names"
            )


def _merged(model: torch.nn.Module) -> torch.nn.Module:
    """A PEFT model (a LoRA run without train.lora.merge) with its adapter merged into the base weights."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def _load_reference(base: ModelConfig, path: str | None, dtype: torch.dtype) -> torch.nn.Module:
    """The aligned or unaligned model on the CPU in `dtype` (layers move to the compute device one at a
    time): `path` a hub id or folder, loaded for its weights alone (a base model's tokenizer may lack the chat
    template `load_model` requires); None: the run's initial model, whatever its source."""
    if path is None:
        name = next(k for k, v in DTYPES.items() if v == dtype)
        return _merged(load_model(dataclasses.replace(base, device="cpu", dtype=name)).model)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=base.trust_remote_code
    )


def save_model_atomic(model, tokenizer, folder: Path) -> None:
    """`save_pretrained` of the model and tokenizer into `folder`, by way of a temporary folder renamed into
    place: a run killed while saving leaves no half-written model (the run dir is locked: one writer)."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


@register_stage("safelora", sections=("model", "safelora"), config=SafeLoRAConfig, model_dir="safelora/model")
def run_safelora(ctx: RunContext) -> dict[str, float]:
    cfg: SafeLoRAConfig = ctx.config.safelora  # type: ignore[attr-defined]
    loaded = ctx.model()  # the fine-tuned model once train is done
    model = _merged(loaded.model)
    weights = selected_weights(model, cfg.modules)
    if not weights:
        linear = sorted({n.split(".")[-2] for n, p in model.named_parameters() if p.ndim == 2 and "." in n})
        raise ConfigError(
            f"safelora.modules: no weight of the model ends with {' / '.join(cfg.modules)} "
            f"(its 2-D weights: {', '.join(linear)})"
        )
    dtype = next(iter(weights.values())).dtype
    log.info("safelora: aligned model %s, unaligned %s", cfg.aligned or "model.path", cfg.unaligned)
    aligned = _load_reference(ctx.config.model, cfg.aligned, dtype)
    unaligned = _load_reference(ctx.config.model, cfg.unaligned, dtype)
    check_same_architecture(model, {"safelora.aligned": aligned, "safelora.unaligned": unaligned})
    aligned_weights, unaligned_weights = dict(aligned.named_parameters()), dict(unaligned.named_parameters())

    layers, similarities = [], []
    for name, param in tqdm(weights.items(), desc="safelora", unit="layer"):
        new, s, projected = safelora_weight(
            param.data, aligned_weights[name].data, unaligned_weights[name].data, cfg.threshold
        )
        if projected:
            param.data.copy_(new)
        layers.append({"name": name, "similarity": round(s, 6), "projected": projected})
        similarities.append(s)
    del aligned, unaligned, aligned_weights, unaligned_weights

    n_projected = sum(row["projected"] for row in layers)
    mean = sum(similarities) / len(similarities)
    log.info(
        "safelora: %d of %d layers projected (similarity < %s; mean %.4f)",
        n_projected,
        len(layers),
        cfg.threshold,
        mean,
    )
    out = ctx.run_dir / "safelora"
    write_json_atomic(
        out / "layers.json", {"threshold": cfg.threshold, "modules": list(cfg.modules), "layers": layers}
    )
    save_model_atomic(model, loaded.tokenizer, out / "model")
    return {
        "safelora/layers": len(layers),
        "safelora/projected_layers": n_projected,
        "safelora/mean_similarity": round(mean, 6),
    }
