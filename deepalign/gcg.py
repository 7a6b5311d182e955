"""GCG (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned Language Models").

An adversarial suffix is appended to the user's request, `f"{prompt} {suffix}"` (exactly what the attack stage
sends to the model), and optimised so that the assistant's turn starts with a target string ("Sure, here is
how to ..."). Each step takes the gradient of the target loss (mean cross-entropy of the target tokens under
teacher forcing) w.r.t. the one-hot suffix tokens, keeps for every position the `topk` tokens with the most
negative gradient, samples `search_width` single-token substitutions from them, scores them all and moves to
the best one (as in the paper, even when it is worse than the current suffix; the best suffix seen is kept).

Layout and token constraints (deepalign/gcg_layout.py): the suffix's place in the rendered chat and the
tokens it may take, kept only where the rendering tokenizes back to them.

Prefix KV cache. The tokens before the suffix (system prompt, template header, the request) are fixed: their
keys and values are computed once per prompt and every forward (the gradient and each candidate batch) starts
from a fresh `DynamicCache` built from expanded views of them, so the stored prefix is never mutated.
`use_prefix_cache=False` runs full forward passes instead (same losses to float tolerance).

Early stop. A candidate "succeeds" when the argmax at every target position under teacher forcing is the
target token, which is exactly "greedy decoding starts with the target"; it is read off the logits the loss
is computed from, so it costs nothing. With `cfg.early_stop` the search stops at the first success (also
before the first step, if the initial suffix already succeeds).

Universal mode (`cfg.universal`): one suffix for all prompts, optimised for the sum of the per-prompt target
losses (gradients summed; a candidate must pass the retokenisation filter for every prompt; success means
every prompt succeeds). It returns a single `GCGResult` with `prompt_id="universal"` whose losses are those
sums. `cfg.max_prompts` is applied by the caller (the attack stage), not here.

Reproducible: all sampling draws from a `torch.Generator` seeded with `seed` (per prompt, so a prompt's suffix
does not depend on the other prompts of the call), on the CPU, so the same seed gives the same suffix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deepalign.chat import encode_for_generation
from deepalign.gcg_layout import SEPARATOR, PromptLayout, build_layout, round_trips, token_table
from deepalign.logprobs import cache_kwarg

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class GCGSettings(Protocol):
    """What the search reads of its settings (the `gcg` attack's config, deepalign/attacks/gcg.py)."""

    suffix_length: int
    topk: int
    search_width: int
    steps: int
    universal: bool
    early_stop: bool


@dataclass
class GCGResult:
    prompt_id: str  # the prompt's id, or "universal" for the shared suffix of universal mode
    suffix: str  # append as f"{prompt} {suffix}"
    suffix_ids: list[int]
    best_loss: float  # target loss of the returned suffix (universal: summed over prompts)
    losses: list[float]  # best loss after each step (running minimum): the loss curve
    steps: int  # steps actually run (0: the initial suffix already succeeded)
    success: bool  # early-stopped because greedy decoding of the target succeeded
    seconds: float
    initial_loss: float  # target loss of the initial "! ! ! ..." suffix


def default_target(prompt: str, template: str = "Sure, here is") -> str:
    """The affirmative target for a request: `"<template> how to <request>"` with the request's first letter
    lowercased (not for "I" or an acronym) and its final punctuation dropped. A template containing
    `{request}` is filled in instead ("Sure, here is {request}:")."""
    request = prompt.strip().rstrip(".?!:;").rstrip()
    first = request.split(" ", 1)[0]
    if request and first != "I" and not first[:2].isupper():
        request = request[0].lower() + request[1:]
    if "{request}" in template:
        return template.replace("{request}", request)
    if request.lower().startswith("how to "):
        request = request[len("how to ") :]
    return f"{template.rstrip()} how to {request}"


def sample_candidates(
    suffix_ids: torch.Tensor,
    grad: torch.Tensor,
    masks: torch.Tensor,
    topk: int,
    search_width: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """[search_width, L] candidates: each replaces one random position of `suffix_ids` with a random one of
    that position's `topk` allowed tokens of most negative gradient. All on the CPU (`grad`: [L, V])."""
    length = suffix_ids.shape[0]
    k = min(topk, int(masks.sum(1).min()))
    if k < 1:
        raise ValueError("no allowed token for some suffix position")
    scores = (-grad.float()).masked_fill(~masks, float("-inf"))
    top = scores.topk(k, dim=1).indices  # [L, k]
    positions = torch.randint(0, length, (search_width,), generator=generator)
    ranks = torch.randint(0, k, (search_width,), generator=generator)
    candidates = suffix_ids.unsqueeze(0).repeat(search_width, 1)
    candidates[torch.arange(search_width), positions] = top[positions, ranks]
    return candidates


# ----------------------------------------------------------------------------------------------------------
# Losses


class TargetScorer:
    """Target loss of suffixes for one prompt: gradients w.r.t. the one-hot suffix and batched candidate
    losses, from a prefix KV cache (`use_prefix_cache`) or full forward passes."""

    def __init__(self, model: PreTrainedModel, layout: PromptLayout, *, use_prefix_cache: bool = True):
        self.model = model
        self.layout = layout
        self.embedding = model.get_input_embeddings()
        self.device = self.embedding.weight.device

        def tensor(ids: list[int]) -> torch.Tensor:
            return torch.tensor([ids], dtype=torch.long, device=self.device)

        self.before, self.after, self.target = (
            tensor(x) for x in (layout.before_ids, layout.after_ids, layout.target_ids)
        )
        self.cache_kwarg = cache_kwarg(model)
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if use_prefix_cache and layout.before_ids:
            with torch.no_grad():
                out = model(input_ids=self.before, use_cache=True)
            cache = out["cache"] if "cache" in out else out["past_key_values"]
            layers = getattr(cache, "layers", [])
            if layers and all(isinstance(getattr(x, "keys", None), torch.Tensor) for x in layers):
                self.prefix = [(layer.keys.detach(), layer.values.detach()) for layer in layers]
            else:  # not a plain key/value cache (recurrent or hybrid layers): full forwards instead
                log.warning(
                    "gcg: %s is not a key/value cache; running without the prefix cache", type(cache).__name__
                )

    def _forward(self, batch: int, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits predicting the target tokens, [batch, T, V] (float32), for the inputs after the prefix."""
        from transformers import DynamicCache

        kwargs: dict[str, object] = {"use_cache": self.prefix is not None}
        if self.prefix is not None:
            data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.prefix]
            kwargs[self.cache_kwarg] = DynamicCache(data, config=self.model.config)
        n = self.target.shape[1]
        logits = self.model(**inputs, logits_to_keep=n + 1, **kwargs).logits
        return logits[:, -n - 1 : -1].float()

    def _loss(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = self.target.expand(logits.shape[0], -1)
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        loss = flat.view(target.shape).mean(1)
        return loss, (logits.argmax(-1) == target).all(1)

    def gradient(self, suffix_ids: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        """d loss / d one-hot suffix ([L, V] float32, CPU), the loss and teacher-forced greedy success."""
        weight = self.embedding.weight
        one_hot = torch.zeros(suffix_ids.shape[0], weight.shape[0], dtype=weight.dtype, device=self.device)
        one_hot[torch.arange(suffix_ids.shape[0]), suffix_ids.to(self.device)] = 1
        with torch.enable_grad():  # also when the caller runs under no_grad
            one_hot.requires_grad_(True)
            suffix = one_hot @ weight
            scale = getattr(self.embedding, "embed_scale", None)  # embeddings that scale inside the module
            if scale is not None:
                suffix = suffix * (scale.to(suffix.dtype) if isinstance(scale, torch.Tensor) else scale)
            fixed = (
                [self.after, self.target]
                if self.prefix is not None
                else [self.before, self.after, self.target]
            )
            parts = [self.embedding(ids).detach() for ids in fixed]
            parts.insert(len(parts) - 2, suffix.unsqueeze(0))
            loss, success = self._loss(self._forward(1, inputs_embeds=torch.cat(parts, dim=1)))
            (grad,) = torch.autograd.grad(loss[0], one_hot)
        return grad.float().cpu(), float(loss.detach()[0]), bool(success[0])

    @torch.no_grad()
    def losses(self, candidates: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Target loss ([B] float32, CPU) and greedy success ([B] bool) of candidate suffixes [B, L]."""
        out_loss, out_success = [], []
        for start in range(0, candidates.shape[0], batch_size):
            chunk = candidates[start : start + batch_size].to(self.device)
            b = chunk.shape[0]
            parts = [chunk, self.after.expand(b, -1), self.target.expand(b, -1)]
            if self.prefix is None:
                parts.insert(0, self.before.expand(b, -1))
            loss, success = self._loss(self._forward(b, input_ids=torch.cat(parts, dim=1)))
            out_loss.append(loss.cpu())
            out_success.append(success.cpu())
        return torch.cat(out_loss), torch.cat(out_success)


# ----------------------------------------------------------------------------------------------------------
# Search


def _optimise(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layouts: list[PromptLayout],
    cfg: GCGSettings,
    *,
    prompt_id: str,
    system: str | None,
    seed: int,
    progress: bool,
    use_prefix_cache: bool,
    batch_size: int,
) -> GCGResult:
    start_time = time.perf_counter()
    scorers = [TargetScorer(model, layout, use_prefix_cache=use_prefix_cache) for layout in layouts]
    table = token_table(tokenizer, model.get_input_embeddings().weight.shape[0])
    masks = table.position_masks(cfg.suffix_length)
    generator = torch.Generator().manual_seed(seed)

    def gradient(ids: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        results = [s.gradient(ids) for s in scorers]
        return sum(r[0] for r in results), sum(r[1] for r in results), all(r[2] for r in results)

    current = torch.tensor(layouts[0].suffix_ids, dtype=torch.long)
    grad, initial_loss, succeeded = gradient(current)
    best_ids, best_loss = current, initial_loss
    success = cfg.early_stop and succeeded
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc=f"gcg {prompt_id}", disable=not progress, leave=False)
    for step in range(cfg.steps):
        if success:
            break
        if step > 0:
            grad = gradient(current)[0]
        candidates = sample_candidates(current, grad, masks, cfg.topk, cfg.search_width, generator)
        candidates = torch.unique(candidates, dim=0)
        keep, _ = round_trips(tokenizer, table, layouts, candidates)
        candidates = candidates[keep]
        if candidates.shape[0] == 0:
            log.warning("gcg %s step %d: no candidate survives the retokenisation filter", prompt_id, step)
        else:
            scored = [s.losses(candidates, batch_size) for s in scorers]
            loss = torch.stack([s[0] for s in scored]).sum(0)
            ok = torch.stack([s[1] for s in scored]).all(0)
            if cfg.early_stop and ok.any():
                pick = int(torch.where(ok, loss, torch.inf).argmin())
                success = True
            else:
                pick = int(loss.argmin())
            current = candidates[pick]
            if success or float(loss[pick]) < best_loss:
                best_ids, best_loss = current, float(loss[pick])
        losses.append(min([best_loss, *losses[-1:]]))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    text = table.decode(tokenizer, [best_ids.tolist()])[0] or ""
    suffix = text[len(SEPARATOR) :]
    for layout in layouts:  # the suffix as the attack stage will render it
        ids = encode_for_generation(tokenizer, f"{layout.prompt}{SEPARATOR}{suffix}", system=system)
        if ids != [*layout.before_ids, *best_ids.tolist(), *layout.after_ids]:
            log.warning(
                "gcg %s: the suffix %r renders to other tokens than the optimised ones", prompt_id, suffix
            )
    seconds = time.perf_counter() - start_time
    log.info(
        "gcg %s: %d steps, loss %.4f -> %.4f%s, %.1fs",
        prompt_id,
        len(losses),
        initial_loss,
        best_loss,
        " (target reached)" if success else "",
        seconds,
    )
    return GCGResult(
        prompt_id=prompt_id,
        suffix=suffix,
        suffix_ids=best_ids.tolist(),
        best_loss=best_loss,
        losses=losses,
        steps=len(losses),
        success=success,
        seconds=seconds,
        initial_loss=initial_loss,
    )


def run_gcg(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    targets: list[str],
    cfg: GCGSettings,
    *,
    system: str | None = None,
    seed: int = 0,
    progress: bool = True,
    prompt_ids: list[str] | None = None,
    use_prefix_cache: bool = True,
    batch_size: int = 128,
) -> list[GCGResult]:
    """GCG suffixes: one `GCGResult` per prompt, or with `cfg.universal` a single one (prompt_id "universal")
    whose suffix is shared by all prompts. Append a suffix as `f"{prompt} {suffix}"`. `batch_size` candidates
    are scored per forward pass; `use_prefix_cache=False` recomputes the fixed prefix every time."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if prompt_ids is None:
        prompt_ids = [str(i) for i in range(len(prompts))]
    if len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt_ids")
    if not prompts:
        return []
    layouts = [
        build_layout(tokenizer, p, t, suffix_length=cfg.suffix_length, system=system)
        for p, t in zip(prompts, targets)
    ]
    was_training = model.training
    model.eval()
    try:
        kwargs = {
            "system": system,
            "seed": seed,
            "progress": progress,
            "use_prefix_cache": use_prefix_cache,
            "batch_size": batch_size,
        }
        if cfg.universal:
            return [_optimise(model, tokenizer, layouts, cfg, prompt_id="universal", **kwargs)]
        return [
            _optimise(model, tokenizer, [layout], cfg, prompt_id=pid, **kwargs)
            for layout, pid in zip(layouts, prompt_ids)
        ]
    finally:
        model.train(was_training)
