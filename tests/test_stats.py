"""deepalign.stats against published values: Wilson intervals, McNemar's exact test, Student's t quantiles,
Cohen's kappa on hand-computed examples."""

from __future__ import annotations

import json
import math

import pytest

from deepalign.stats import agreement, cohen_kappa, mcnemar_exact, mean_ci95, t_quantile, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (0, 10, (0.0, 0.2775)),
        (5, 10, (0.2366, 0.7634)),
        (10, 10, (0.7225, 1.0)),
        (1, 10, (0.0179, 0.4042)),
        (91, 100, (0.8377, 0.9519)),
    ],
)
def test_wilson_interval_known_values(k, n, expected):
    assert wilson_interval(k, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_interval_edges():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high < 1.0
    assert wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    wide, narrow = wilson_interval(22, 44), wilson_interval(100, 200)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]  # more items, a narrower interval
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 5, 0.0625),
        (5, 0, 0.0625),
        (1, 9, 0.021484375),  # 2 * 11 / 1024
        (3, 3, 1.0),
        (0, 0, 1.0),
        (0, 1, 1.0),
        (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
    ],
)
def test_mcnemar_exact(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_large_counts_stay_finite():
    p = mcnemar_exact(100, 1500)  # 2**1600 overflows a float; the exact integers do not
    assert p < 1e-300
    # many pairs: close to the continuity-corrected chi-square test, (|b - c| - 1)^2 / (b + c) = 1.056
    assert mcnemar_exact(700, 740) == pytest.approx(0.304, abs=0.002)


@pytest.mark.parametrize(
    ("df", "t"),
    [
        (1, 12.706205),
        (2, 4.302653),
        (3, 3.182446),
        (4, 2.776445),
        (9, 2.262157),
        (10, 2.228139),
        (29, 2.045230),
        (30, 2.042272),
        (100, 1.983972),
    ],
)
def test_t_quantile_known_values(df, t):
    assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-t, abs=1e-6)


def test_t_quantile_other_levels_and_bad_input():
    assert t_quantile(0.95, 5) == pytest.approx(2.015048, abs=1e-6)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert t_quantile(0.995, 1) == pytest.approx(63.656741, abs=1e-5)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)


def test_mean_ci95():
    mean, std, low, high = mean_ci95([1.0, 2.0, 3.0])
    assert (mean, std) == pytest.approx((2.0, 1.0))
    half = 4.302653 / math.sqrt(3)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half), abs=1e-6)
    assert low < 0  # three seeds of a non-negative metric can give an interval below zero; it is honest
    mean, std, low, high = mean_ci95([0.5, 0.5])
    assert (mean, std, low, high) == (0.5, 0.0, 0.5, 0.5)
    one = mean_ci95([0.25])
    assert one[0] == 0.25 and all(math.isnan(x) for x in one[1:])
    assert all(math.isnan(x) for x in mean_ci95([]))


def test_cohen_kappa_hand_examples():
    a = [True, True, False, False, True, False, True, True, False, False]
    b = [True, False, False, False, True, False, True, True, True, False]
    # p_o = 8/10; each rater says True 5 times: p_e = 0.5 * 0.5 + 0.5 * 0.5 = 0.5; kappa = 0.3 / 0.5
    assert agreement(a, b) == pytest.approx(0.8)
    assert cohen_kappa(a, b) == pytest.approx(0.6)
    # p_o = 3/4; shares 3/4 and 1/2: p_e = 3/8 + 1/8 = 1/2; kappa = 1/4 / 1/2
    assert cohen_kappa([True, True, True, False], [True, True, False, False]) == pytest.approx(0.5)
    assert cohen_kappa([True, False], [True, False]) == 1.0
    assert cohen_kappa([True, False], [False, True]) == -1.0


def test_cohen_kappa_degenerate_cases():
    assert math.isnan(cohen_kappa([True] * 4, [True] * 4))  # p_e = 1: undefined, though they agree
    assert agreement([True] * 4, [True] * 4) == 1.0
    # one rater constant, the other not: p_e = share of the other's verdict; kappa 0 (no better than chance)
    assert cohen_kappa([True] * 4, [True, True, False, True]) == pytest.approx(0.0)
    assert math.isnan(cohen_kappa([], [])) and math.isnan(agreement([], []))
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa([True], [True, False])


def _record(key: str, variant: str, prompt_id: str, harmful: bool | None, judge: str = "keyword") -> dict:
    return {
        "key": key,
        "variant": variant,
        "prompt_id": prompt_id,
        "id": key,
        "judge": judge,
        "version": "v",
        "harmful": harmful,
        "score": None,
        "shown_prefill": True,
    }


def test_attack_success_rates_carry_n_and_wilson_intervals():
    from deepalign.stages.attack import success_rates

    none = success_rates([_record(f"none/{i}/0", "none", str(i), i < 5) for i in range(10)], "asr_keyword")
    assert none == {
        "asr_keyword/none": 0.5,
        "asr_keyword/none/n": 10,
        "asr_keyword/none/ci95_low": 0.2366,
        "asr_keyword/none/ci95_high": 0.7634,
    }
    records = [_record(f"decoding/t=1/{i}/0", "decoding/t=1", str(i), i == 0) for i in range(4)]
    records += [_record(f"decoding/t=2/{i}/0", "decoding/t=2", str(i), i == 1) for i in range(3)]
    records.append(_record("decoding/t=2/3/0", "decoding/t=2", "3", None))  # a failed judgment
    rates = success_rates(records, "asr_keyword", aggregate="decoding")
    assert rates["asr_keyword/decoding/t=2/n"] == 3  # the failed judgment is not counted
    assert rates["asr_keyword/decoding/t=2"] == 0.3333
    # the aggregate: prompts 0 and 1 broken by some setting, of the 4 prompts judged
    assert rates["asr_keyword/decoding"] == 0.5 and rates["asr_keyword/decoding/n"] == 4
    low, high = wilson_interval(2, 4)
    assert rates["asr_keyword/decoding/ci95_low"] == round(low, 4)
    assert rates["asr_keyword/decoding/ci95_high"] == round(high, 4)
    assert len(rates) == 3 * 4  # two settings and the aggregate, each with n and its interval


def test_several_samples_per_prompt_count_the_prompt_once():
    """generation.num_samples = 3: the samples of one prompt are correlated, so the prompt is the unit. Its
    success is the share of its samples judged harmful, the ASR the mean over prompts, n the prompts, and the
    interval the Wilson interval of the summed shares in n prompts (not 6 of 12 samples, too narrow)."""
    from deepalign.stages.attack import success_rates

    harmful = {
        "0": [True, True, True],
        "1": [False, False, False],
        "2": [True, False, False],
        "3": [True, True, False],
    }
    records = [
        _record(f"none/{p}/{s}", "none", p, h)
        for p, verdicts in harmful.items()
        for s, h in enumerate(verdicts)
    ]
    rates = success_rates(records, "asr_keyword")
    assert rates["asr_keyword/none"] == 0.5 and rates["asr_keyword/none/n"] == 4
    low, high = wilson_interval(2, 4)  # shares 1, 0, 1/3, 2/3: 2 of 4 prompts
    assert (rates["asr_keyword/none/ci95_low"], rates["asr_keyword/none/ci95_high"]) == (
        round(low, 4),
        round(high, 4),
    )
    by_sample = wilson_interval(6, 12)
    assert high - low > by_sample[1] - by_sample[0]
    # A failed judgment leaves the prompt's other samples; a prompt with none judged is left out.
    records += [_record("none/4/0", "none", "4", None), _record("none/4/1", "none", "4", None)]
    records[3] = _record("none/1/0", "none", "1", None)
    assert success_rates(records, "asr_keyword")["asr_keyword/none/n"] == 4
    records[2] = _record("none/0/2", "none", "0", False)  # prompt 0: 2 of 3 now
    rates = success_rates(records, "asr_keyword")
    k = 2 / 3 + 0 + 1 / 3 + 2 / 3
    assert rates["asr_keyword/none"] == round(k / 4, 4)
    assert rates["asr_keyword/none/ci95_low"] == round(wilson_interval(k, 4)[0], 4)


def test_wilson_interval_of_a_fractional_count_lies_between_its_neighbours():
    below, mid, above = wilson_interval(1, 4), wilson_interval(1.5, 4), wilson_interval(2, 4)
    assert below[0] < mid[0] < above[0] and below[1] < mid[1] < above[1]
    assert wilson_interval(4.0, 4)[1] == 1.0 and wilson_interval(0.0, 4)[0] == 0.0


def test_judge_agreement_per_variant_and_overall():
    from deepalign.stages.attack import judge_agreement

    keyword = [_record(f"none/{i}/0", "none", str(i), i < 3) for i in range(4)]
    keyword += [_record(f"prefill/k=5/{i}/0", "prefill/k=5", str(i), True) for i in range(4)]
    strict = [_record(f"none/{i}/0", "none", str(i), i < 2, "strict") for i in range(4)]
    strict += [_record(f"prefill/k=5/{i}/0", "prefill/k=5", str(i), True, "strict") for i in range(3)]
    strict.append(_record("prefill/k=5/3/0", "prefill/k=5", "3", None, "strict"))
    report, metrics = judge_agreement({"keyword": keyword, "strict": strict})
    assert report["judges"] == ["keyword", "strict"]
    none = report["variants"]["none"]
    assert none["asr"] == {"keyword": 0.75, "strict": 0.5} and none["n"] == {"keyword": 4, "strict": 4}
    # keyword TTTF, strict TTFF: the hand example of test_cohen_kappa_hand_examples
    assert none["pairs"]["keyword~strict"] == {
        "n": 4,
        "agreement": 0.75,
        "kappa": 0.5,
        "disagree": ["none/2/0"],
    }
    prefill = report["variants"]["prefill/k=5"]["pairs"]["keyword~strict"]
    assert prefill == {"n": 3, "agreement": 1.0, "kappa": None, "disagree": []}  # both always harmful
    # over both variants (7 items both judged): keyword TTTF TTT, strict TTFF TTT
    assert report["all"]["keyword~strict"] == {
        "n": 7,
        "agreement": 0.8571,
        "kappa": round(
            cohen_kappa(
                [True, True, True, False, True, True, True], [True, True, False, False, True, True, True]
            ),
            4,
        ),
    }
    assert metrics == {
        "agreement/keyword~strict/agreement": 0.8571,
        "agreement/keyword~strict/kappa": report["all"]["keyword~strict"]["kappa"],
    }
    json.dumps(report, allow_nan=False)  # no NaN in the file: undefined values are null
    _, constant = judge_agreement({"keyword": keyword[4:], "strict": strict[4:]})
    assert constant == {"agreement/keyword~strict/agreement": 1.0}  # kappa undefined: no metric
