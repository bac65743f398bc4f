"""The intervals published numbers carry (aha.stats), against values published elsewhere."""

import math
import random

import pytest

from aha.stats import (
    bootstrap_perplexity_change,
    paired_difference_interval,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [  # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat Med 17:857, Table II, method 3
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_newcombes_table(successes, trials, low, high):
    assert wilson_interval(successes, trials) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_of_a_perfect_score_is_not_a_point():
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(0.8389, abs=5e-5)  # 20 of 20 prompts: anything above 84% fits
    assert wilson_interval(100, 100)[0] == pytest.approx(0.9630, abs=5e-5)
    narrower = wilson_interval(19, 20, confidence=0.5)
    assert wilson_interval(19, 20)[0] < narrower[0] < narrower[1] < wilson_interval(19, 20)[1]


@pytest.mark.parametrize(("successes", "trials"), [(3, 0), (-1, 5), (6, 5)])
def test_wilson_interval_refuses_impossible_counts(successes, trials):
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(successes, trials)


def _paired(both: int, only_first: int, only_second: int, neither: int) -> tuple[list[bool], list[bool]]:
    pairs = [(True, True)] * both + [(True, False)] * only_first + [(False, True)] * only_second + [(False, False)] * neither
    random.Random(0).shuffle(pairs)
    return [a for a, _ in pairs], [b for _, b in pairs]


def test_paired_difference_matches_newcombes_method_10():
    # Fagerland, Lydersen and Laake, "Statistical Analysis of Contingency Tables" (2017), chapter 8, the
    # table (59, 6; 16, 80): Newcombe square-and-add interval -0.0621 (-0.1186 to -0.0046), as the
    # R package contingencytables computes it (its tests/testthat/test-ch8.R)
    difference, low, high = paired_difference_interval(*_paired(59, 6, 16, 80))
    assert (difference, low, high) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=5e-5)


def test_paired_difference_uses_the_pairing():
    first, second = _paired(12, 2, 1, 5)  # prompts both get right or both miss pin the difference down
    difference, low, high = paired_difference_interval(first, second)
    assert difference == pytest.approx(0.05) and low < 0 < high
    (low1, high1), (low2, high2) = wilson_interval(14, 20), wilson_interval(13, 20)
    independent = math.hypot(0.7 - low1, high2 - 0.65) + math.hypot(0.65 - low2, high1 - 0.7)  # as if unpaired
    assert high - low < 0.75 * independent
    assert paired_difference_interval(second, first) == pytest.approx((-difference, -high, -low))
    assert paired_difference_interval([True] * 20, [True] * 20)[0] == 0.0
    with pytest.raises(ValueError, match="paired"):
        paired_difference_interval([True], [True, False])


def test_bootstrap_change_of_identical_models_is_zero():
    nll = [float(i) for i in range(1, 9)]
    assert bootstrap_perplexity_change(nll, nll, [10] * 8) == (0.0, 0.0, 0.0)


def test_bootstrap_change_of_a_constant_per_token_gap_is_exact():
    tokens = [100, 250, 80, 400]
    reference = [300.0, 700.0, 250.0, 1100.0]
    gap = 0.02  # nats per token on every sequence: every resample gives the same change
    change, low, high = bootstrap_perplexity_change([r + gap * t for r, t in zip(reference, tokens)], reference, tokens)
    assert change == pytest.approx(math.expm1(gap)) and low == pytest.approx(change) and high == pytest.approx(change)


def test_bootstrap_interval_agrees_with_the_normal_approximation_on_many_sequences():
    rng = random.Random(1)
    gaps = [rng.gauss(0.01, 0.05) for _ in range(400)]  # per-token nll gap of each 100-token sequence
    reference = [300.0] * 400
    change, low, high = bootstrap_perplexity_change([300.0 + 100 * g for g in gaps], reference, [100] * 400, seed=3)
    mean = sum(gaps) / len(gaps)
    spread = 1.96 * math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1) / len(gaps))
    assert change == pytest.approx(math.expm1(mean))
    assert low == pytest.approx(math.expm1(mean - spread), abs=1e-3) and high == pytest.approx(math.expm1(mean + spread), abs=1e-3)
    again = bootstrap_perplexity_change([300.0 + 100 * g for g in gaps], reference, [100] * 400, seed=3)
    assert again == (change, low, high)  # seeded: the published interval is reproducible


def test_bootstrap_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="per sequence"):
        bootstrap_perplexity_change([1.0, 2.0], [1.0], [5, 5])
    with pytest.raises(ValueError, match="at least one target"):
        bootstrap_perplexity_change([1.0], [1.0], [0])
