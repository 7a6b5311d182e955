"""Statistics for attack success rates and seeds: Wilson intervals, judge agreement (Cohen's kappa), the exact
McNemar test on paired verdicts, and the 95% interval of a mean (Student's t).

Our own, in the standard library: none of the project's dependencies provides these (scipy is not one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959964  # the standard normal's 0.975 quantile: two-sided 95%


def wilson_interval(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / n (95% with the default z).

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point at 0 or n
    successes: 0 of 10 gives (0, 0.28), not (0, 0). With n = 0 there is no estimate: (nan, nan). `k` may be
    fractional: the summed per-prompt success shares of an ASR over n prompts with several samples each
    (deepalign/stages/attack.py `success_rates`), whose variance is at most that of k of n Bernoulli draws.
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, center - half)  # exact ends where rounding would leave 1e-17
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def _paired(a: Sequence[bool], b: Sequence[bool]) -> None:
    if len(a) != len(b):
        raise ValueError(f"two raters must rate the same items: {len(a)} and {len(b)} verdicts")


def agreement(a: Sequence[bool], b: Sequence[bool]) -> float:
    """The share of items on which the two raters' verdicts are equal (nan with no items)."""
    _paired(a, b)
    if not a:
        return math.nan
    return sum(x == y for x, y in zip(a, b)) / len(a)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two raters' binary verdicts on the same items: (p_o - p_e) / (1 - p_e), with p_o
    the observed agreement and p_e the agreement expected by chance from each rater's share of True.

    1 is perfect agreement, 0 no better than chance, below 0 worse. Undefined (nan) when p_e = 1, i.e. both
    raters give one and the same verdict to every item (chance alone explains their agreement), and with no
    items.
    """
    _paired(a, b)
    if not a:
        return math.nan
    n = len(a)
    p_o = agreement(a, b)
    share_a, share_b = sum(a) / n, sum(b) / n
    p_e = share_a * share_b + (1 - share_a) * (1 - share_b)
    if p_e >= 1.0:
        return math.nan
    return (p_o - p_e) / (1 - p_e)


def mcnemar_exact(b: int, c: int) -> float:
    """The two-sided exact McNemar p-value of paired binary outcomes.

    `b` and `c` are the discordant pairs (broken under A only, under B only); under the null hypothesis of
    equal rates each discordant pair falls either way with probability 1/2, so the p-value is
    min(1, 2 * P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2). No discordant pair: 1.0.
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers, one correctly rounded division


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer number of degrees of freedom (the finite series of
    Abramowitz and Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term, total = 1.0, 1.0
        for j in range(2, df, 2):
            term *= c2 * (j - 1) / j
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    # odd df > 1: 2/pi * (theta + sin * cos * (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
    term, total = 1.0, 1.0
    for j in range(3, df - 1, 2):
        term *= c2 * (j - 1) / j
        total += term
    return 2 / math.pi * (theta + s * math.sqrt(c2) * total)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` (a positive integer) degrees of freedom, by bisection on
    its distribution function (exact to about 1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if df < 1 or int(df) != df:
        raise ValueError(f"t_quantile: df must be a positive integer, got {df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    central = 2 * p - 1  # P(|T| <= t) at the p-quantile t
    low, high = 0.0, 1.0
    while _t_central(high, df) < central:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        if _t_central(mid, df) < central:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sample std, low, high): the 95% confidence interval of the mean, mean +- t * std / sqrt(n)
    with Student's t quantile at n - 1 degrees of freedom (three seeds: t = 4.30, not the normal 1.96).

    With one value there is no spread to estimate: (mean, nan, nan, nan); with none, all nan.
    """
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half
