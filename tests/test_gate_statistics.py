"""The gate's statistics on known distributions, including ties, tiny samples and constant data."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from agent.gate.statistics import (
    bootstrap_quantile_draws,
    hl_rank_bound,
    hodges_lehmann,
    kth_difference,
    proportion_test,
    shift_test,
    tail_test,
    u_null_cdf,
    wilson_interval,
)


def all_differences(baseline, candidate):
    return np.sort((np.asarray(candidate)[None, :] - np.asarray(baseline)[:, None]).ravel())


@pytest.mark.parametrize("m,n,integers", [(5, 7, False), (40, 33, False), (50, 70, True), (1, 9, True)])
def test_kth_difference_matches_brute_force(m, n, integers):
    rng = np.random.default_rng(m * 100 + n)
    draw = (lambda size: rng.integers(0, 5, size).astype(float)) if integers else (lambda size: rng.normal(size=size))
    baseline, candidate = np.sort(draw(m)), np.sort(draw(n) + 0.3)
    differences = all_differences(baseline, candidate)
    for k in sorted({1, 2, m * n // 3, m * n // 2, m * n - 1, m * n} - {0}):
        assert kth_difference(baseline, candidate, k) == differences[k - 1]
    assert hodges_lehmann(baseline, candidate) == pytest.approx(np.median(differences))


def test_kth_difference_on_samples_big_enough_for_the_sampled_bracket():
    rng = np.random.default_rng(17)
    baseline = np.sort(rng.lognormal(0, 1, 2000))
    candidate = np.sort(np.round(rng.lognormal(0.1, 1, 1500), 2))  # ties on one side
    differences = all_differences(baseline, candidate)
    for k in (1, 7, 150_000, 1_500_000, 2_999_000, 3_000_000):
        assert kth_difference(baseline, candidate, k) == differences[k - 1], k


def test_exact_u_distribution_matches_enumeration():
    m, n = 3, 4
    counts = np.zeros(m * n + 1)
    for chosen in itertools.combinations(range(m + n), m):
        # U = number of (baseline, candidate) pairs with the candidate ranked higher.
        u = sum(sum(1 for j in range(m + n) if j not in chosen and j > i) for i in chosen)
        counts[u] += 1
    np.testing.assert_allclose(u_null_cdf(m, n), np.cumsum(counts) / counts.sum())


def test_rank_bound_matches_published_table():
    # Hollander & Wolfe, Table A.6: C_alpha = 24 for m = n = 10 at 95% (two-sided).
    assert hl_rank_bound(10, 10, 0.95) == 24
    # Exact and normal approximations agree near the switch-over size.
    assert abs(hl_rank_bound(60, 60, 0.98) - hl_rank_bound(61, 61, 0.98)) < 0.05 * 60 * 61


def test_hodges_lehmann_interval_covers_the_true_shift_at_its_level():
    rng = np.random.default_rng(7)
    covered = 0
    repetitions = 300
    for _ in range(repetitions):
        baseline = rng.exponential(1.0, 25)
        candidate = rng.exponential(1.0, 30) + 0.5
        low, high = shift_test(baseline, candidate, confidence=0.98).interval
        covered += low <= 0.5 <= high
    # 98% nominal; a binomial 99.9% band around 0.98*300 is roughly 285..300.
    assert covered >= 285


def test_shift_test_detects_a_shift_and_not_a_null():
    rng = np.random.default_rng(3)
    baseline = rng.lognormal(0, 0.5, 2000)
    shifted = shift_test(baseline, rng.lognormal(0, 0.5, 2000) + 0.2)
    assert shifted.p_value < 1e-6 and shifted.interval[0] > 0.1
    null = shift_test(baseline, rng.lognormal(0, 0.5, 2000))
    assert null.interval[0] < 0 < null.interval[1]


def test_constant_data_is_no_change():
    result = shift_test([5.0] * 30, [5.0] * 40)
    assert result.estimate == 0 and result.interval == (0.0, 0.0) and result.p_value == 1.0


def test_constant_but_different_data_is_a_certain_shift():
    result = shift_test([5.0] * 30, [7.0] * 30)
    assert result.estimate == 2.0 and result.interval == (2.0, 2.0) and result.p_value < 1e-6


def test_tiny_samples_have_no_interval():
    result = shift_test([1.0, 2.0], [3.0, 4.0], confidence=0.98)
    assert result.interval == (-math.inf, math.inf)
    assert any("too few samples" in note for note in result.notes)


def test_heavy_ties_keep_the_test_honest():
    rng = np.random.default_rng(11)
    baseline = rng.integers(0, 3, 500).astype(float)
    same = shift_test(baseline, rng.integers(0, 3, 500).astype(float))
    assert same.estimate == 0.0 and same.p_value > 0.01
    worse = shift_test(baseline, rng.integers(1, 4, 500).astype(float))
    assert worse.estimate == 1.0 and worse.p_value < 1e-6


def test_bootstrap_quantile_draws_match_naive_resampling():
    rng = np.random.default_rng(5)
    values = np.sort(rng.lognormal(0, 1, 2000))
    fast = bootstrap_quantile_draws(values, 0.99, 4000, np.random.default_rng(1))
    naive = np.array([np.sort(rng.choice(values, values.size))[math.ceil(0.99 * values.size) - 1]
                      for _ in range(1000)])
    assert fast.mean() == pytest.approx(naive.mean(), rel=0.03)
    assert fast.std() == pytest.approx(naive.std(), rel=0.15)


def test_tail_test_sees_a_fatter_tail():
    rng = np.random.default_rng(9)
    baseline = rng.lognormal(0, 0.4, 30000)
    result = tail_test(baseline, rng.lognormal(0, 0.4, 30000) * 1.10)
    assert result.interval[0] > 0.0 and result.interval[0] < 0.10 < result.interval[1]
    null = tail_test(baseline, rng.lognormal(0, 0.4, 30000))
    assert null.interval[0] < 0 < null.interval[1]


def test_wilson_interval_known_value():
    low, high = wilson_interval(0, 10, 1.959964)
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-4)


def test_proportion_test_zero_events_and_real_difference():
    none = proportion_test(0, 1000, 0, 1000)
    assert none.estimate == 0 and none.interval[0] < 0 < none.interval[1] and none.p_value == 1.0
    worse = proportion_test(0, 1350, 3, 150)
    assert worse.interval[0] > 0 and worse.p_value < 0.01
