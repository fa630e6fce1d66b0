"""Person-level statistics and the unlearning measures, against scipy / scikit-learn and hand computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from vleraser_jax.eval import statistics as st
from vleraser_jax.eval import unlearning as ul
from vleraser_jax.eval.likelihood import AnswerScores, membership_scores, option_choice
from vleraser_jax.eval.membership import privleak


def test_the_cluster_bootstrap_widens_with_duplicated_items_while_the_item_bootstrap_shrinks():
    """Copying every item of every person 5 times adds no information about people: the cluster interval must
    not shrink (it widens slightly with no new people), the naive item interval shrinks by about √5."""
    rng = np.random.default_rng(0)
    people = [f"p{i}" for i in range(15)]
    ability = rng.uniform(0.1, 0.9, len(people))  # people differ: their items are correlated
    values, clusters = [], []
    for p, a in zip(people, ability):
        for _ in range(4):
            values.append(float(rng.random() < a))
            clusters.append(p)
    width = lambda e: e["ci_high"] - e["ci_low"]
    once_c = st.cluster_bootstrap_ci(values, clusters, resamples=4000, seed=1)
    five_c = st.cluster_bootstrap_ci(values * 5, clusters * 5, resamples=4000, seed=1)
    once_i = st.item_bootstrap_ci(values, resamples=4000, seed=1)
    five_i = st.item_bootstrap_ci(values * 5, resamples=4000, seed=1)
    assert once_c["value"] == five_c["value"] == pytest.approx(np.mean(values))
    assert width(five_c) >= 0.95 * width(once_c)
    assert width(five_i) < 0.6 * width(once_i)
    assert (once_c["n"], once_c["n_people"], five_c["n"], five_c["n_people"]) == (60, 15, 300, 15)
    assert width(once_c) > width(once_i)  # the correlation of a person's items is not hidden


def test_paired_permutation_p_value_is_the_exact_sign_flip_test():
    rng = np.random.default_rng(3)
    people = [f"p{i}" for i in range(8)]
    clusters = [p for p in people for _ in range(3)]
    a = rng.random(len(clusters)) + np.repeat(np.linspace(0, 0.4, 8), 3)
    b = rng.random(len(clusters))
    out = st.paired_difference(a, b, clusters, resamples=500)
    d = np.array([(a - b)[i * 3:(i + 1) * 3].sum() for i in range(8)])
    observed = abs(d.sum())
    flips = [abs((np.array(signs) * d).sum()) for signs in itertools.product((1, -1), repeat=8)]
    expected = np.mean([f >= observed - 1e-12 for f in flips])
    assert out["p_value"] == pytest.approx(expected)
    assert out["value"] == pytest.approx(np.mean(a - b)) and out["n_people"] == 8 and out["n"] == 24
    assert out["ci_low"] <= out["value"] <= out["ci_high"]
    assert st.paired_difference(a, a, clusters)["p_value"] == 1.0


def test_forget_quality_utility_and_power_match_scipy():
    rng = np.random.default_rng(1)
    x, y = rng.lognormal(0, 1, 120), rng.lognormal(0.5, 1, 90)
    fq = st.forget_quality(x, y)
    ref = stats.ks_2samp(x, y)
    assert fq["value"] == ref.pvalue and fq["statistic"] == ref.statistic and (fq["n"], fq["n_reference"]) == (120, 90)
    assert st.model_utility([0.5, 0.8, 0.9]) == pytest.approx(stats.hmean([0.5, 0.8, 0.9]))
    assert st.model_utility([0.5, 0.0]) == 0.0
    values, clusters = [1, 0, 1, 1, 0, 0, 1, 1], ["a", "a", "b", "b", "c", "c", "d", "d"]
    means = np.array([0.5, 1.0, 0.0, 1.0])
    mdd = st.minimum_detectable_difference(values, clusters)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert mdd["value"] == pytest.approx(z * np.sqrt(2) * means.std(ddof=1) / 2)


def test_membership_scores_and_auc_by_hand():
    rng = np.random.default_rng(2)
    scores = [AnswerScores(rng.normal(-2, 1, n), rng.normal(-2.5, 0.3, n), rng.uniform(0.5, 2, n)) for n in (3, 7, 5, 10)]
    out = membership_scores(scores, k=0.4)
    for s, loss, mink in zip(scores, out["loss"], out["mink_pp"]):
        assert loss == pytest.approx(s.logprob.mean())
        z = np.sort((s.logprob - s.vocab_mean) / np.sqrt(s.vocab_var))
        assert mink == pytest.approx(z[: max(1, int(len(z) * 0.4))].mean())
    member, other = rng.normal(1, 1, 40), rng.normal(0, 1, 50)
    pairs = np.mean([(m > o) + 0.5 * (m == o) for m in member for o in other])  # Mann-Whitney
    auc = roc_auc_score([1] * 40 + [0] * 50, np.r_[member, other])
    assert auc == pytest.approx(pairs)
    assert privleak(0.75, 0.5) == pytest.approx(50.0)


def test_option_choice_follows_lm_evaluation_harness_and_tofu():
    options = {"A": "Oslo", "B": "Lima town", "C": "Pune", "D": "Kobe"}
    lp = {"A": [-1.0, -1.0], "B": [-0.4, -0.4, -0.4], "C": [-3.0], "D": [-2.0, -0.1]}
    scores = [AnswerScores(np.array(lp[k]), np.zeros(len(lp[k])), np.ones(len(lp[k]))) for k in "ABCD"]
    # sums A −2.0, B −1.2, C −3.0, D −2.1: acc picks B; per character A −0.5, B −0.133, C −0.75, D −0.525
    out = option_choice(scores, options, "A")
    assert out["option_acc"] == 0.0 and out["option_acc_norm"] == 0.0
    assert option_choice(scores, options, "B")["option_acc"] == 1.0
    per_token = np.array([-1.0, -0.4, -3.0, -1.05])
    assert out["truth_ratio"] == pytest.approx(np.exp(np.mean(per_token[1:]) - per_token[0]))


def test_unlearning_summary_pairs_items_and_reads_progress():
    def items(shift):
        return [{"set": s, "mode": "textual", "metric": m, "person": f"p{i}", "item": f"x{j}",
                 "value": float(np.clip(v + shift * (s == "forget"), 0, 1))}
                for s in ("forget", "retain", "real") for m in ("cloze", "option_acc", "rougeL", "truth_ratio")
                for i in range(6) for j, v in enumerate((0.9, 0.8))]

    def results(its):
        out = {}
        for r in its:
            out.setdefault(r["set"], {}).setdefault(r["mode"], {}).setdefault(r["metric"], []).append(r["value"])
        return {s: {m: {k: {"value": float(np.mean(v)), "n": len(v)} for k, v in ms.items()} for m, ms in modes.items()}
                for s, modes in out.items()}

    vanilla, oracle, method = items(0.0), items(-0.8), items(-0.4)
    refs = {"Vanilla": (results(vanilla), vanilla), "Oracle": (results(oracle), oracle)}
    summary = ul.unlearning_summary(results(method), method, refs, resamples=200)
    assert summary["progress"]["textual"]["forget/cloze"] == pytest.approx(0.5)
    d = summary["vs"]["Vanilla"]["forget"]["textual"]["cloze"]
    assert d["value"] == pytest.approx(-0.4) and d["n_people"] == 6
    assert summary["vs"]["Vanilla"]["retain"]["textual"]["cloze"]["value"] == 0.0
    assert set(summary["forget_quality"]) == {"textual", "all"}
    assert 0 < summary["model_utility"]["textual"] <= 1
    with pytest.raises(ValueError, match="different items"):
        ul.compare(method, vanilla[1:])
