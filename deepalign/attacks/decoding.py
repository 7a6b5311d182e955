"""The `decoding` attack type: the decoding-parameter exploit (Huang et al. 2023). Its variants are
`<name>/greedy`, `<name>/temperature=T`, `<name>/top_k=K` and `<name>/top_p=P`, each setting varied alone;
it aggregates (`asr/<name>`: a prompt is broken if any setting breaks it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deepalign.attacks.base import Attack, AttackRun
from deepalign.config import check
from deepalign.eval_items import Variant
from deepalign.generation import SamplingParams
from deepalign.plugins import register_attack


@dataclass
class DecodingAttackConfig:
    temperatures: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 21)])
    top_ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100, 200, 500])
    top_ps: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 21)])
    greedy: bool = True
    samples_per_setting: int = 1

    def check(self, key: str) -> None:
        for i, t in enumerate(self.temperatures):
            check(t > 0, f"{key}.temperatures[{i}]", f"must be > 0, got {t}")
        for i, p in enumerate(self.top_ps):
            check(0 < p <= 1, f"{key}.top_ps[{i}]", f"must be in (0, 1], got {p}")
        for i, k in enumerate(self.top_ks):
            check(k >= 0, f"{key}.top_ks[{i}]", f"must be >= 0 (0 = off), got {k}")
        for name, values in (
            ("temperatures", self.temperatures),
            ("top_ks", self.top_ks),
            ("top_ps", self.top_ps),
        ):
            names = [f"{v:g}" for v in values]  # as the variant names write them
            for i, text in enumerate(names):
                check(
                    text not in names[:i],
                    f"{key}.{name}[{i}]",
                    f"{text} is listed twice: both settings would be one variant, every answer counted twice",
                )


def decoding_grid(
    cfg: DecodingAttackConfig, max_new_tokens: int, name: str = "decoding"
) -> list[tuple[str, SamplingParams]]:
    """The decoding exploit's settings: greedy, then temperature, top-k and top-p each varied alone."""
    grid = []
    if cfg.greedy:
        grid.append((f"{name}/greedy", SamplingParams(do_sample=False, max_new_tokens=max_new_tokens)))
    for t in cfg.temperatures:
        grid.append((f"{name}/temperature={t:g}", SamplingParams(True, t, 1.0, 0, max_new_tokens)))
    for k in cfg.top_ks:
        grid.append((f"{name}/top_k={k}", SamplingParams(True, 1.0, 1.0, k, max_new_tokens)))
    for p in cfg.top_ps:
        grid.append((f"{name}/top_p={p:g}", SamplingParams(True, 1.0, p, 0, max_new_tokens)))
    return grid


@register_attack("decoding", config=DecodingAttackConfig)
class DecodingAttack(Attack):
    """The decoding-parameter exploit (Huang et al. 2023): temperature, top-k, top-p varied one at a time."""

    aggregate = True

    def variants(self, run: AttackRun, base: SamplingParams) -> list[Variant]:
        n = self.cfg.samples_per_setting
        grid = decoding_grid(self.cfg, base.max_new_tokens, self.name)
        return [Variant(name, p, n=1 if not p.do_sample else n) for name, p in grid]
