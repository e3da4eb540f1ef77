"""The gate's statistics, each on raw samples.

- shift_test: two-sided Mann-Whitney U (scipy) plus the Hodges-Lehmann shift and its
  distribution-free confidence interval (Lehmann 1963; Hollander & Wolfe ch. 4). scipy computes
  the U test but has no HL interval, so it is implemented here.
- tail_test: percentile-bootstrap interval of the relative p99 difference.
- proportion_test: Fisher's exact test (scipy) with Newcombe's hybrid-score interval of the
  difference of two proportions (Newcombe 1998, method 10).

Conventions: `baseline` is blue, `candidate` is green; every difference is candidate - baseline,
so a positive shift of a latency means green is slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

# Above this sample size the exact null distribution of U is replaced by its normal
# approximation: the recurrence below is O(m * n * m * n), which stays well under 10 ms at 60 x 60.
EXACT_U_MAX_SAMPLES = 60


@dataclass
class TestResult:
    """One comparison: what was tested, the estimate and its interval, in the metric's units."""

    test: str
    estimate: float
    interval: tuple[float, float]
    p_value: float
    baseline_count: int
    candidate_count: int
    confidence: float
    baseline_center: float = float("nan")
    candidate_center: float = float("nan")
    notes: list[str] = field(default_factory=list)

    @property
    def half_width(self) -> float:
        low, high = self.interval
        return (high - low) / 2.0


def as_sorted_array(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    array = array[np.isfinite(array)]
    array.sort()
    return array


@lru_cache(maxsize=64)
def u_null_cdf(m: int, n: int) -> np.ndarray:
    """Exact CDF of the Mann-Whitney U statistic under H0 (no ties), for U = 0..m*n.

    Recurrence on probabilities (not counts) so nothing overflows:
    P_{m,n}(u) = m/(m+n) * P_{m-1,n}(u - n) + n/(m+n) * P_{m,n-1}(u).
    """
    # previous[j] holds P_{i-1, j}; current builds P_{i, j} for j = 0..n.
    size = m * n + 1
    previous = [np.zeros(size) for _ in range(n + 1)]
    for j in range(n + 1):
        previous[j][0] = 1.0  # P_{0,j}: U is always 0
    for i in range(1, m + 1):
        current = [np.zeros(size) for _ in range(n + 1)]
        current[0][0] = 1.0  # P_{i,0}
        for j in range(1, n + 1):
            weight_left = i / (i + j)
            shifted = np.zeros(size)
            shifted[j:] = previous[j][: size - j]
            current[j] = weight_left * shifted + (1.0 - weight_left) * current[j - 1]
        previous = current
    return np.cumsum(previous[n])


def hl_rank_bound(m: int, n: int, confidence: float, tie_counts: np.ndarray | None = None) -> int:
    """k such that [D_(k), D_(mn+1-k)] is a `confidence` interval of the shift (1-indexed).

    Returns 0 when the samples are too small for any interval at this level.
    """
    alpha = 1.0 - confidence
    if max(m, n) <= EXACT_U_MAX_SAMPLES:
        cdf = u_null_cdf(m, n)
        # Coverage of [D_(k), D_(mn+1-k)] is 1 - 2 P(U <= k - 1).
        below = np.nonzero(cdf <= alpha / 2.0 + 1e-12)[0]
        return int(below[-1]) + 1 if below.size else 0
    # scipy on first use, in each test: `import scipy.stats` took 3.1 s here (load 9), a cost every
    # command that imports the gate would pay.
    from scipy.stats import norm

    total = m + n
    tie_term = 0.0
    if tie_counts is not None and tie_counts.size:
        tie_term = float(np.sum(tie_counts**3 - tie_counts)) / (total * (total - 1))
    variance = m * n / 12.0 * ((total + 1) - tie_term)
    z = norm.ppf(1.0 - alpha / 2.0)
    k = math.floor(m * n / 2.0 - z * math.sqrt(max(variance, 0.0)))
    return max(k, 0)


def count_differences_at_most(baseline: np.ndarray, candidate: np.ndarray, threshold: float) -> int:
    """#{(i, j): candidate_j - baseline_i <= threshold}, both arrays sorted, in O(m log n)."""
    return int(np.searchsorted(candidate, baseline + threshold, side="right").sum())


def count_differences_below(baseline: np.ndarray, candidate: np.ndarray, threshold: float) -> int:
    """#{(i, j): candidate_j - baseline_i < threshold}, the strict twin of the count above."""
    return int(np.searchsorted(candidate, baseline + threshold, side="left").sum())


# Once the bracket around the k-th difference holds this few pairs they are listed and selected
# directly: a few bisection steps plus one partition beat ~60 float bisection steps.
ENUMERATE_PAIRS = 200_000


def _sampled_bracket(baseline, candidate, k, low, count_low, high, count_high):
    """Narrow (low, high] around the k-th difference with the quantiles of 100 000 random pairs
    (+-5 standard errors), checked with the exact counts; halves the bisection steps on big samples."""
    m, n = baseline.size, candidate.size
    draws = 100_000
    generator = np.random.default_rng(k)
    sample = np.sort(candidate[generator.integers(0, n, draws)] - baseline[generator.integers(0, m, draws)])
    share = k / (m * n)
    margin = 5.0 * math.sqrt(share * (1.0 - share) / draws) + 2.0 / draws
    low_index, high_index = math.floor((share - margin) * draws), math.ceil((share + margin) * draws)
    if low_index >= 0:
        guess = float(sample[low_index])
        count = count_differences_at_most(baseline, candidate, guess)
        if count < k and guess > low:
            low, count_low = guess, count
    if high_index < draws:
        guess = float(sample[high_index])
        count = count_differences_at_most(baseline, candidate, guess)
        if count >= k and guess < high:
            high, count_high = guess, count
    return low, count_low, high, count_high


def kth_difference(baseline: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """The k-th smallest (1-indexed) of the m*n differences candidate_j - baseline_i.

    Selection by bisection on the value with a counting oracle, so 200 000 x 200 000 samples never
    materialise 4e10 differences; when the bracket is small its differences are listed and the
    answer picked exactly.
    """
    m, n = baseline.size, candidate.size
    if not 1 <= k <= m * n:
        raise ValueError(f"k={k} outside 1..{m * n}")
    low = candidate[0] - baseline[-1]  # smallest difference
    high = candidate[-1] - baseline[0]  # largest: count(high) = m*n
    count_low = count_differences_at_most(baseline, candidate, low)
    if count_low >= k:
        return float(low)
    count_high = m * n
    if m * n > 4 * ENUMERATE_PAIRS:
        low, count_low, high, count_high = _sampled_bracket(baseline, candidate, k, low, count_low, high,
                                                            count_high)
    # Invariant: count(low) < k <= count(high). Steps interpolate the count linearly (the CDF of
    # the differences is smooth inside a narrow bracket), aiming just below and just above k in
    # turn so both ends close in; every third step bisects, which bounds the worst case.
    for step in range(200):
        if count_high - count_low <= ENUMERATE_PAIRS:
            break
        if step % 3 == 0 and count_differences_below(baseline, candidate, high) < k:
            # Heavy ties (integer ns from a fast loop: a few dozen distinct differences over
            # 10^9 pairs) put millions of pairs exactly on `high`, which no bisection splits and
            # listing them took minutes; fewer than k below it means the k-th is the tied value,
            # read off a real pair (`high` may be a bisection point an ulp away from it).
            firsts = np.searchsorted(candidate, baseline + high, side="left")
            inside = firsts < n
            return float((candidate[firsts[inside]] - baseline[inside]).min())
        if step % 3 == 2:
            fraction = 0.5
        else:
            target = k + (-1 if step % 3 == 0 else 1) * ENUMERATE_PAIRS / 4.0
            fraction = min(0.999, max(0.001, (target - count_low) / (count_high - count_low)))
        middle = low + (high - low) * fraction
        if middle <= low or middle >= high:
            break
        count_middle = count_differences_at_most(baseline, candidate, middle)
        if count_middle >= k:
            high, count_high = middle, count_middle
        else:
            low, count_low = middle, count_middle
    # Every difference in (low, high], listed row by row from the sorted candidate.
    starts = np.searchsorted(candidate, baseline + low, side="right")
    ends = np.searchsorted(candidate, baseline + high, side="right")
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return float(high)
    rows = np.repeat(np.arange(m), lengths)
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    differences = candidate[starts[rows] + offsets] - baseline[rows]
    rank = min(max(k - count_low, 1), total) - 1
    return float(np.partition(differences, rank)[rank])


def hodges_lehmann(baseline: np.ndarray, candidate: np.ndarray) -> float:
    """Median of all pairwise differences candidate_j - baseline_i."""
    total = baseline.size * candidate.size
    # Past a million pairs the two middle differences are indistinguishable for any decision.
    if total % 2 or total > 1_000_000:
        return kth_difference(baseline, candidate, total // 2 + 1)
    return 0.5 * (kth_difference(baseline, candidate, total // 2)
                  + kth_difference(baseline, candidate, total // 2 + 1))


def shift_test(baseline_values, candidate_values, confidence: float = 0.98) -> TestResult:
    """Mann-Whitney U (two-sided) with the Hodges-Lehmann shift and its interval."""
    from scipy.stats import mannwhitneyu

    baseline = as_sorted_array(baseline_values)
    candidate = as_sorted_array(candidate_values)
    m, n = baseline.size, candidate.size
    result = TestResult("mann-whitney-u + hodges-lehmann", float("nan"), (-math.inf, math.inf),
                        float("nan"), m, n, confidence)
    if m == 0 or n == 0:
        result.notes.append("no samples")
        return result
    result.baseline_center = float(np.median(baseline))
    result.candidate_center = float(np.median(candidate))
    combined = np.concatenate([baseline, candidate])
    if combined[0] == combined[-1]:
        # Constant data: U's variance is zero (scipy returns nan); the samples are identical.
        result.estimate, result.interval, result.p_value = 0.0, (0.0, 0.0), 1.0
        result.notes.append("constant data")
        return result
    _, tie_counts = np.unique(combined, return_counts=True)
    has_ties = bool((tie_counts > 1).any())
    method = "exact" if max(m, n) <= 8 and not has_ties else "asymptotic"
    result.p_value = float(mannwhitneyu(candidate, baseline, alternative="two-sided",
                                        method=method).pvalue)
    result.estimate = hodges_lehmann(baseline, candidate)
    k = hl_rank_bound(m, n, confidence, tie_counts if has_ties else None)
    if k >= 1:
        result.interval = (kth_difference(baseline, candidate, k),
                           kth_difference(baseline, candidate, m * n + 1 - k))
    else:
        result.notes.append(f"too few samples ({m} vs {n}) for a {confidence:.0%} interval")
    if has_ties and max(m, n) <= EXACT_U_MAX_SAMPLES:
        result.notes.append("ties: the exact interval is approximate")
    return result


def bootstrap_quantile_draws(sorted_values: np.ndarray, quantile: float, resamples: int,
                             generator: np.random.Generator) -> np.ndarray:
    """`resamples` draws of the quantile of a bootstrap resample of `sorted_values`.

    The r-th order statistic of a resample is <= x_(k) exactly when at least r of the n draws land
    in x_(1..k), a Binomial(n, k/n) event. Sampling that distribution by inversion gives the same
    bootstrap distribution as resampling, in O(n + B log n) instead of O(B n log n).
    """
    from scipy.stats import binom

    n = sorted_values.size
    rank = max(1, math.ceil(quantile * n))  # lower order statistic as the quantile
    ks = np.arange(1, n + 1)
    cdf = binom.sf(rank - 1, n, ks / n)  # P(X*_(rank) <= x_(k))
    cdf[-1] = 1.0
    picks = np.searchsorted(cdf, generator.random(resamples), side="left")
    return sorted_values[np.minimum(picks, n - 1)]


def order_quantile(sorted_values: np.ndarray, quantile: float) -> float:
    rank = max(1, math.ceil(quantile * sorted_values.size))
    return float(sorted_values[rank - 1])


def tail_test(baseline_values, candidate_values, quantile: float = 0.99, confidence: float = 0.98,
              resamples: int = 2000, seed: int | None = 0) -> TestResult:
    """Relative difference of a high quantile, (q_candidate - q_baseline) / q_baseline, with a
    percentile-bootstrap interval. The estimate is a ratio so a threshold reads as "+10% p99"."""
    baseline = as_sorted_array(baseline_values)
    candidate = as_sorted_array(candidate_values)
    m, n = baseline.size, candidate.size
    result = TestResult(f"bootstrap p{quantile * 100:g} ratio", float("nan"), (-math.inf, math.inf),
                        float("nan"), m, n, confidence)
    if m == 0 or n == 0:
        result.notes.append("no samples")
        return result
    base_q = order_quantile(baseline, quantile)
    cand_q = order_quantile(candidate, quantile)
    result.baseline_center, result.candidate_center = base_q, cand_q
    if base_q == 0:
        result.estimate = 0.0 if cand_q == 0 else math.inf
        result.notes.append("baseline quantile is zero: relative difference undefined")
        return result
    result.estimate = cand_q / base_q - 1.0
    generator = np.random.default_rng(seed)
    base_draws = bootstrap_quantile_draws(baseline, quantile, resamples, generator)
    cand_draws = bootstrap_quantile_draws(candidate, quantile, resamples, generator)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = cand_draws / base_draws - 1.0
    ratios = ratios[np.isfinite(ratios)]
    alpha = 1.0 - confidence
    if ratios.size:
        low, high = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0])
        result.interval = (float(low), float(high))
        # Bootstrap p-value: twice the smaller tail mass on either side of zero.
        below = float(np.mean(ratios <= 0.0))
        above = float(np.mean(ratios >= 0.0))
        result.p_value = min(1.0, 2.0 * min(below, above))
    # With fewer than ~1/(1-q) samples above the quantile the bootstrap collapses onto the max.
    tail_points = min(m, n) * (1.0 - quantile)
    if tail_points < 5:
        result.notes.append(f"only {tail_points:.1f} samples beyond p{quantile * 100:g}: interval unreliable")
    return result


def wilson_interval(events: int, trials: int, z: float) -> tuple[float, float]:
    if trials == 0:
        return 0.0, 1.0
    p = events / trials
    denominator = 1.0 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    margin = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, center - margin), min(1.0, center + margin)


def proportion_test(baseline_events: int, baseline_trials: int, candidate_events: int,
                    candidate_trials: int, confidence: float = 0.98) -> TestResult:
    """Difference of proportions (candidate - baseline): Fisher's exact test and Newcombe's
    interval, which stays sensible at zero events where the Wald interval collapses to a point."""
    from scipy.stats import fisher_exact, norm

    result = TestResult("fisher-exact + newcombe", float("nan"), (-1.0, 1.0), float("nan"),
                        baseline_trials, candidate_trials, confidence)
    if baseline_trials == 0 or candidate_trials == 0:
        result.notes.append("no trials")
        return result
    p1 = baseline_events / baseline_trials
    p2 = candidate_events / candidate_trials
    result.baseline_center, result.candidate_center = p1, p2
    result.estimate = p2 - p1
    z = float(norm.ppf(1.0 - (1.0 - confidence) / 2.0))
    l1, u1 = wilson_interval(baseline_events, baseline_trials, z)
    l2, u2 = wilson_interval(candidate_events, candidate_trials, z)
    delta = p2 - p1
    low = delta - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    high = delta + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    result.interval = (low, high)
    table = [[candidate_events, candidate_trials - candidate_events],
             [baseline_events, baseline_trials - baseline_events]]
    result.p_value = float(fisher_exact(table, alternative="two-sided").pvalue)
    return result
