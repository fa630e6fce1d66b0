"""Statistics about people: forget and retain numbers are clustered by person.

- `cluster_bootstrap_ci`: the item-weighted mean of a metric with a percentile interval from resampling *people*
  (each drawn person brings all their items), so the correlation of one person's items widens the interval
  instead of hiding in it (`item_bootstrap_ci`, which resamples items, is kept for comparison only);
- `paired_difference`: method − reference on the very same items, with a cluster-bootstrap interval and a
  person-level paired permutation p-value (`scipy.stats.permutation_test` flipping each person's summed
  difference; exact up to 16 people);
- `forget_quality`: TOFU's KS-test p-value between two truth-ratio samples (`scipy.stats.ks_2samp`);
- `model_utility`: the harmonic mean of utility scores (`scipy.stats.hmean`);
- `minimum_detectable_difference`: the smallest person-level difference a paired test at level α detects with
  the given power.
Every entry says how many items and how many people stand behind it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats


def _by_cluster(values: Sequence[float], clusters: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(per-cluster sums, per-cluster item counts), clusters in sorted order."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for v, c in zip(values, clusters):
        sums[c] += float(v)
        counts[c] += 1
    keys = sorted(sums)
    return np.array([sums[k] for k in keys]), np.array([counts[k] for k in keys], float)


def _empty(**extra) -> dict:
    nan = float("nan")
    return {"value": nan, "ci_low": nan, "ci_high": nan, "n": 0, "n_people": 0, **extra}


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence[str], *, resamples: int = 1000,
                         confidence: float = 0.95, seed: int = 0) -> dict:
    """Item-weighted mean with a percentile interval from resampling clusters (people) with replacement.

    Returns {"value", "ci_low", "ci_high", "n" (items), "n_people"}; with one person the interval is that
    person's mean twice (nothing to resample): read it with n_people.
    """
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return _empty()
    if len(clusters) != x.size:
        raise ValueError(f"{x.size} values but {len(clusters)} cluster labels")
    sums, counts = _by_cluster(x, clusters)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"value": float(x.mean()), "ci_low": float(low), "ci_high": float(high), "n": int(x.size),
            "n_people": int(len(sums))}


def item_bootstrap_ci(values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """The naive interval: items resampled as if independent (for comparison with `cluster_bootstrap_ci`)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return _empty()
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"value": float(x.mean()), "ci_low": float(low), "ci_high": float(high), "n": int(x.size)}


def paired_difference(method: Sequence[float], reference: Sequence[float], clusters: Sequence[str], *,
                      resamples: int = 1000, permutations: int = 9999, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """mean(method − reference) over the same items, its cluster-bootstrap interval and the two-sided p-value of
    a person-level paired permutation test (H0: within each person, the two models' items are exchangeable).

    Returns {"value", "ci_low", "ci_high", "p_value", "n", "n_people"}.
    """
    a, b = np.asarray(method, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.shape} vs {b.shape}")
    if a.size == 0:
        return _empty(p_value=float("nan"))
    out = cluster_bootstrap_ci(a - b, clusters, resamples=resamples, confidence=confidence, seed=seed)
    sum_a, counts = _by_cluster(a, clusters)
    sum_b, _ = _by_cluster(b, clusters)
    if np.allclose(sum_a, sum_b):
        return {**out, "p_value": 1.0}
    if len(counts) < 2:  # one person: nothing to permute
        return {**out, "p_value": float("nan")}
    n_items = counts.sum()
    exact = 2 ** len(counts)
    test = stats.permutation_test(
        (sum_a, sum_b), lambda x, y, axis: (x - y).sum(axis=axis) / n_items, permutation_type="samples",
        vectorized=True, n_resamples=exact if exact <= 65536 else permutations, alternative="two-sided",
        random_state=np.random.default_rng([seed, 1]))
    return {**out, "p_value": float(test.pvalue)}


def forget_quality(method_truth_ratios: Sequence[float], oracle_truth_ratios: Sequence[float]) -> dict:
    """TOFU's forget quality: the two-sample KS-test p-value between a model's and the oracle's truth ratios on
    the forget items (high: indistinguishable from the oracle). Items are treated as independent, as TOFU does."""
    a, b = np.asarray(method_truth_ratios, float), np.asarray(oracle_truth_ratios, float)
    if a.size == 0 or b.size == 0:
        return {"value": float("nan"), "statistic": float("nan"), "n": int(a.size), "n_reference": int(b.size)}
    result = stats.ks_2samp(a, b)
    return {"value": float(result.pvalue), "statistic": float(result.statistic), "n": int(a.size),
            "n_reference": int(b.size)}


def model_utility(scores: Iterable[float]) -> float:
    """Harmonic mean of utility scores in [0, 1] (0 if any is 0; NaN if there is none)."""
    x = np.asarray([s for s in scores if not np.isnan(s)], float)
    if x.size == 0:
        return float("nan")
    if (x <= 0).any():
        return 0.0
    return float(stats.hmean(x))


def person_means(values: Sequence[float], clusters: Sequence[str]) -> np.ndarray:
    sums, counts = _by_cluster(values, clusters)
    return sums / counts


def minimum_detectable_difference(values: Sequence[float], clusters: Sequence[str], *, alpha: float = 0.05,
                                  power: float = 0.8) -> dict:
    """The smallest difference in the person-level mean that a two-sided paired test at level `alpha` detects
    with probability `power`, when each model's per-person scores spread as these do and vary independently:
    MDD = (z(1 − α/2) + z(power)) · √2 · s / √K, s the SD of the K per-person means."""
    means = person_means(values, clusters)
    k = len(means)
    if k < 2:
        return {"value": float("nan"), "n_people": k, "alpha": alpha, "power": power}
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return {"value": float(z * np.sqrt(2.0) * means.std(ddof=1) / np.sqrt(k)), "n_people": k, "alpha": alpha,
            "power": power, "person_sd": float(means.std(ddof=1))}


def pair_items(method_items: Iterable[Mapping], reference_items: Iterable[Mapping], set_name: str, mode: str,
               metric: str) -> tuple[list[float], list[float], list[str]]:
    """The values of one (set, mode, metric) that both models scored, matched by (person, item): (method,
    reference, people). Raises if the two evaluations scored different items (they must share a protocol)."""
    def select(items):
        return {(r["person"], r["item"]): r["value"] for r in items
                if r["set"] == set_name and r["mode"] == mode and r["metric"] == metric}

    a, b = select(method_items), select(reference_items)
    if a.keys() != b.keys():
        raise ValueError(f"{set_name}/{mode}/{metric}: the two evaluations scored different items "
                         f"({len(a)} vs {len(b)}; same config and seed needed)")
    keys = sorted(a)
    return [a[k] for k in keys], [b[k] for k in keys], [k[0] for k in keys]
