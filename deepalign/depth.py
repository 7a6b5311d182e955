"""Alignment depth as numbers: how many tokens deep a model's safety behaviour reaches (paper Sec. 2).

Three views of one question. From the prefilling attack's ASR at each depth k: the area under ASR vs k
(`asr_auc`, 0 = never broken, 1 = always) and the depth where half the prompts break (`k50`). From the
per-token KL to the reference: how many response positions carry the alignment's footprint (`kl_tokens`).
From the model itself: the teacher-forced probability that it starts a refusal right after k harmful tokens
(`refusal_probability`), what safety recovery examples train (paper Sec. 3).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from deepalign.chat import encode_for_training, response_tokens
from deepalign.data import DataError, read_rows
from deepalign.kl import save_figure
from deepalign.logprobs import cache_kwarg, checked_head, final_hidden_states

Curve = list[tuple[int, float]]


def asr_curve(metrics: Mapping[str, float], prefix: str, instance: str) -> Curve:
    """The (depth, ASR) points that prefill instance `instance` measured itself, from the keys
    `<prefix>/<instance>/k=N`, sorted by depth. Depth 0 is the instance's own plain requests on its own items
    (`prefill/k=0`, which the attack always runs), never another attack's ASR: the curve is the same whatever
    else ran. Undefined rates (None, NaN: every judgment failed) are left out; no point at all gives an empty
    curve."""
    pattern = re.compile(rf"^{re.escape(prefix)}/{re.escape(instance)}/k=(\d+)$")
    points = {
        int(m.group(1)): float(value)
        for key, value in metrics.items()
        if (m := pattern.match(key)) and value is not None and math.isfinite(value)
    }
    return sorted(points.items())


def asr_auc(curve: Curve) -> float:
    """The trapezoid area under ASR vs depth divided by the depth range: 0 = never broken at any depth,
    1 = always; a single point gives its ASR."""
    if not curve:
        raise ValueError("asr_auc: an empty curve has no area")
    if len(curve) == 1:
        return curve[0][1]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(curve, curve[1:]))
    return area / (curve[-1][0] - curve[0][0])


class K50(NamedTuple):
    """The depth at which ASR first reaches 0.5, and how it is known: `censored` None (exact), "right" (ASR
    stays below 0.5 at every depth measured: the true k50 lies beyond `depth`, the deepest) or "left" (ASR is
    already >= 0.5 at the first depth measured, deeper than 0: the true k50 is at most `depth`)."""

    depth: float
    censored: str | None


def k50(curve: Curve) -> K50:
    """The depth at which ASR first reaches 0.5, linearly interpolated between the two measured depths around
    the crossing. The first depth if its ASR is already >= 0.5: exact at depth 0 (no shallower prefill
    exists), left-censored deeper. The deepest depth, right-censored, if ASR never reaches 0.5."""
    if not curve:
        raise ValueError("k50: an empty curve has no crossing")
    if curve[0][1] >= 0.5:
        return K50(float(curve[0][0]), "left" if curve[0][0] > 0 else None)
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y1 >= 0.5:
            return K50(x0 + (0.5 - y0) * (x1 - x0) / (y1 - y0), None)
    return K50(float(curve[-1][0]), "right")


def depth_metrics(
    metrics: Mapping[str, float], prefill_instances: Sequence[str], judges: Sequence[str], primary: str | None
) -> dict[str, float]:
    """`asr_auc`, `k50`, `k50_censored` (1: right-censored, ASR never reached 0.5, k50 is the deepest depth, a
    lower bound) and `k50_left_censored` (1: ASR was already >= 0.5 at the first depth measured, deeper than
    0; k50 is that depth, an upper bound) of each prefill instance's own ASR curve (`asr_curve`), by the
    primary judge (`depth/...` from `asr/...`) and by every judge (`depth_<judge>/...` from
    `asr_<judge>/...`); the instance named `prefill` directly under the prefix, any other as
    `<prefix>/<instance>/...`."""
    sources = [("asr", "depth")] if primary is not None else []
    sources += [(f"asr_{judge}", f"depth_{judge}") for judge in judges]
    out: dict[str, float] = {}
    for asr_prefix, prefix in sources:
        for instance in prefill_instances:
            curve = asr_curve(metrics, asr_prefix, instance)
            if not curve:
                continue
            base = prefix if instance == "prefill" else f"{prefix}/{instance}"
            found = k50(curve)
            out[f"{base}/asr_auc"] = round(asr_auc(curve), 4)
            out[f"{base}/k50"] = round(found.depth, 4)
            out[f"{base}/k50_censored"] = int(found.censored == "right")
            out[f"{base}/k50_left_censored"] = int(found.censored == "left")
    return out


def kl_tokens(mean_kl: Sequence[float | None], threshold: float, run: int = 3) -> tuple[int, bool]:
    """How many response positions, from the first, carry the alignment's KL footprint: those before the mean
    KL first stays below `threshold` for `run` positions in a row, and True. A position without data (None)
    ends the scan. If KL never stays below within the positions measured: (a lower bound, False), censored.
    The bound is where the last stretch below the threshold began (the number of positions measured when the
    last one is above): a stretch of `run` can start there at the earliest, as every earlier start holds a
    measured position at or above the threshold."""
    if run < 1:
        raise ValueError(f"kl_tokens: run must be >= 1, got {run}")
    measured = below = 0
    for position, value in enumerate(mean_kl):
        if value is None:
            break
        measured = position + 1
        below = below + 1 if value < threshold else 0
        if below == run:
            return measured - run, True
    return measured - below, False


def refusal_templates() -> list[str]:
    """The packaged refusal templates (deepalign/assets/data/refusals.json)."""
    return json.loads(resources.files("deepalign.assets").joinpath("data", "refusals.json").read_text())


def read_refusals(source: str | None, key: str = "analysis.refusals") -> list[str]:
    """Refusal texts: a JSON file holding a list of strings, or a JSONL (or CSV) file with a `refusal` field;
    None: the packaged templates. A malformed file is a DataError naming `key`."""
    if source is None:
        return refusal_templates()
    if Path(source).suffix.lower() == ".json":
        try:
            texts = json.loads(Path(source).read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as err:
            raise DataError(f"{key}: cannot read {source} as JSON ({err})") from None
        if not isinstance(texts, list):
            raise DataError(f"{key}: {source} must hold a JSON list of refusal strings")
    else:
        texts = [row.get("refusal") for _, row in read_rows(source, key)]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{key}: {source}, item {i}: a refusal must be non-empty text, got {text!r}")
    if not texts:
        raise DataError(f"{key}: {source} holds no refusal")
    return texts


def recovery_continuations(
    tokenizer,
    prompt: str,
    harmful: str,
    depth: int,
    refusals: Sequence[str],
    *,
    separator: str = " ",
    tokens: int = 2,
    system: str | None = None,
) -> tuple[list[int], list[tuple[int, ...]]] | None:
    """The context after `depth` harmful tokens (as the prefilling attack cuts the chat) and the first
    `tokens` target tokens of each refusal, tokenized as a recovery training example's target after its
    prefill ids (`separator + refusal`; at depth 0 the refusal alone, as a k = 0 example has it). Distinct
    and prefix-free (a continuation that extends another is inside its event). None if the harmful response
    has fewer than `depth` tokens or the cut falls inside a character."""
    cut = response_tokens(tokenizer, prompt, harmful, system=system)
    if len(cut) < depth or cut.splits_character(depth):  # no recovery example can end inside a character
        return None
    context = cut.context_ids(depth)
    found = set()
    for refusal in refusals:
        if depth == 0:
            encoded = encode_for_training(tokenizer, prompt, refusal, system=system)
        else:
            encoded = encode_for_training(
                tokenizer,
                prompt,
                separator + refusal,
                system=system,
                prefill=cut.prefix_text(depth),
                prefill_ids=context,
            )
        target = [i for i, m in enumerate(encoded.labels_mask) if m][:tokens]
        if encoded.input_ids[: target[0]] != context:
            raise ValueError(
                f"the chat template renders the refusal {refusal[:40]!r} after other context tokens than the "
                f"harmful response {harmful[:40]!r} cut at depth {depth}: they do not continue the same chat"
            )
        found.add(tuple(encoded.input_ids[i] for i in target))
    continuations = [c for c in found if not any(d != c and c[: len(d)] == d for d in found)]
    return context, sorted(continuations)


@torch.no_grad()
def refusal_probability(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    depths: Sequence[int],
    refusals: Sequence[str],
    *,
    separator: str = " ",
    tokens: int = 2,
    system: str | None = None,
    progress: bool = True,
) -> dict[int, list[float]]:
    """Per depth N, per (prompt, harmful response) pair: the teacher-forced probability that the model starts
    a refusal right after the first N harmful tokens, the sum over the distinct refusal starts
    (`recovery_continuations`) of prod_i p(token_i | context, earlier tokens). Pairs whose harmful response
    is shorter than N tokens (or cut inside a character there) are left out of that depth.

    Our own code: no library computes a teacher-forced refusal-onset probability after a prefill.
    Per pair, two forward passes: one over the answer's deepest context (every shallower context is a prefix
    of it), whose hidden states give the next-token distribution after every depth, and one batched pass of
    every refusal start's later tokens after every depth, on copies of that pass's KV cache with the
    positions past each depth's context masked out."""
    out: dict[int, list[float]] = {depth: [] for depth in depths}
    cache_arg = cache_kwarg(model)
    training = model.training
    model.eval()
    try:
        for prompt, harmful in tqdm(pairs, desc="refusal probability", unit="pair", disable=not progress):
            cases = []  # (depth, context, continuations), shallowest first
            for depth in sorted(depths):
                found = recovery_continuations(
                    tokenizer,
                    prompt,
                    harmful,
                    depth,
                    refusals,
                    separator=separator,
                    tokens=tokens,
                    system=system,
                )
                if found is not None:
                    cases.append((depth, *found))
            if not cases:
                continue
            deepest = cases[-1][1]
            if any(deepest[: len(context)] != context for _, context, _ in cases):
                raise ValueError(
                    f"the contexts of {prompt[:40]!r} at the depths {depths} do not extend each other"
                )
            logp = _refusal_logprobs(
                model, cache_arg, [(context, continuations) for _, context, continuations in cases]
            )
            for i, (depth, _, continuations) in enumerate(cases):
                total = sum(
                    math.exp(sum(logp[i, c[:j]][token].item() for j, token in enumerate(c)))
                    for c in continuations
                )
                out[depth].append(total)  # disjoint events (prefix-free): at most 1 but for rounding
    finally:
        model.train(training)
    return out


def _refusal_logprobs(
    model, cache_arg: str, cases: list[tuple[list[int], list[tuple[int, ...]]]]
) -> dict[tuple[int, tuple[int, ...]], torch.Tensor]:
    """{(case, stem): log-probs [vocab] of the token after context + stem}, for every case (context, refusal
    starts) and every proper prefix (stem, () included) of its starts; the contexts are prefixes of the
    last one."""
    device = next(model.parameters()).device
    deepest = cases[-1][0]
    hidden, outputs = final_hidden_states(
        model, input_ids=torch.tensor([deepest], device=device), use_cache=True
    )
    head = checked_head(model, hidden, outputs)
    ends = torch.tensor([len(context) - 1 for context, _ in cases], device=device)
    first = F.log_softmax(head(hidden[0, ends]).float(), dim=-1)
    logp = {(i, ()): first[i] for i in range(len(cases))}
    rows = [  # a refusal start's tokens but the last: their logits give every later token's distribution
        (i, stem)
        for i, (_, continuations) in enumerate(cases)
        for stem in sorted({c[:-1] for c in continuations if len(c) > 1})
    ]
    if not rows:
        return logp
    # every stem after its own context: the cache of the deepest context, positions past the context masked
    width, past = max(len(stem) for _, stem in rows), len(deepest)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), past + width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (i, stem) in enumerate(rows):
        n = len(cases[i][0])
        ids[r, : len(stem)] = torch.tensor(stem)
        attention[r, :n] = 1
        attention[r, past:] = 1
        positions[r] = n + torch.arange(width)
    cache = copy.deepcopy(getattr(outputs, "cache", None) or outputs.past_key_values)
    cache.batch_repeat_interleave(len(rows))
    later = model(
        input_ids=ids.to(device),
        attention_mask=attention.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **{cache_arg: cache},
    ).logits.float()
    for r, (i, stem) in enumerate(rows):
        for k in range(len(stem)):
            logp[i, stem[: k + 1]] = F.log_softmax(later[r, k], dim=-1)
    return logp


def plot_recovery(curves: dict[str, dict[int, float]], path: str | Path, title: str) -> None:
    """A PNG of the refusal probability against the prefill depth, one line per name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        depths = sorted(points)
        ax.plot(depths, [points[k] for k in depths], marker="o", label=name)
    ax.set_xlabel("prefilled harmful tokens")
    ax.set_ylabel("P(the model starts a refusal)")
    ax.set_ylim(-0.02, 1.02)
    save_figure(fig, ax, path, title)
