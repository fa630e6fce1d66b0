"""What unlearning means, measured against the model retrained without the forget people (the Oracle):
paired differences to Vanilla and to the Oracle on the same items and people, how far the forget numbers moved
from Vanilla towards the Oracle, TOFU's forget quality, model utility, membership inference and privleak.

`unlearning_summary` computes one model's entry from its per-item scores (`EvalResult.items`) and the
reference models'; the report renders it (`report_tables.unlearning_table`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from . import statistics as st
from .membership import ATTACKS, privleak

# (set, metric) pairs compared with the references: knowledge (cloze, option likelihood) and generation
COMPARED = tuple((s, m) for s in ("forget", "test", "retain", "real") for m in ("cloze", "option_acc", "rougeL"))
# what moves from Vanilla towards the Oracle when unlearning works
PROGRESS_METRICS = (("forget", "cloze"), ("forget", "option_acc"))
# model utility: the harmonic mean of these scores on the retain and real sets
UTILITY_METRICS = ("cloze", "rougeL", "option_acc")
UTILITY_SETS = ("retain", "real")


def _modes(items: Sequence[Mapping]) -> list[str]:
    return sorted({r["mode"] for r in items})


def compare(method_items: Sequence[Mapping], reference_items: Sequence[Mapping], *, resamples: int = 1000,
            seed: int = 0) -> dict:
    """{set: {mode: {metric: `statistics.paired_difference` of method − reference}}} for `COMPARED`."""
    out: dict = {}
    for mode in _modes(method_items):
        for set_name, metric in COMPARED:
            a, b, people = st.pair_items(method_items, reference_items, set_name, mode, metric)
            if a:
                out.setdefault(set_name, {}).setdefault(mode, {})[metric] = st.paired_difference(
                    a, b, people, resamples=resamples, seed=seed)
    return out


def _value(results: Mapping, set_name: str, mode: str, metric: str) -> float | None:
    entry = results.get(set_name, {}).get(mode, {}).get(metric)
    return None if not entry or not entry.get("n") else float(entry["value"])


def progress_to_oracle(results: Mapping, vanilla: Mapping, oracle: Mapping) -> dict:
    """{mode: {"forget/metric": (V − M) / (V − O)}}: 0 at Vanilla, 1 at the Oracle (None when V = O)."""
    out: dict = {}
    for mode in ("visual", "textual"):
        for set_name, metric in PROGRESS_METRICS:
            m, v, o = (_value(r, set_name, mode, metric) for r in (results, vanilla, oracle))
            if None in (m, v, o):
                continue
            out.setdefault(mode, {})[f"{set_name}/{metric}"] = None if abs(v - o) < 1e-12 else (v - m) / (v - o)
    return out


def utility(results: Mapping) -> dict:
    """{mode: harmonic mean of `UTILITY_METRICS` on `UTILITY_SETS`, "all": over both modes}."""
    out, everything = {}, []
    for mode in ("visual", "textual"):
        scores = [v for s in UTILITY_SETS for m in UTILITY_METRICS if (v := _value(results, s, mode, m)) is not None]
        if scores:
            out[mode] = st.model_utility(scores)
            everything += scores
    if everything:
        out["all"] = st.model_utility(everything)
    return out


def truth_ratios(items: Sequence[Mapping], mode: str | None = None, set_name: str = "forget") -> list[float]:
    """The per-item truth ratios of a set (one mode, or both), in a fixed order."""
    chosen = [r for r in items if r["metric"] == "truth_ratio" and r["set"] == set_name
              and (mode is None or r["mode"] == mode)]
    return [r["value"] for r in sorted(chosen, key=lambda r: (r["mode"], r["person"], r["item"]))]


def forget_quality(method_items: Sequence[Mapping], oracle_items: Sequence[Mapping]) -> dict:
    """{mode | "all": KS p-value of the forget truth ratios against the Oracle's}."""
    out = {mode: st.forget_quality(truth_ratios(method_items, mode), truth_ratios(oracle_items, mode))
           for mode in _modes(method_items)}
    out["all"] = st.forget_quality(truth_ratios(method_items), truth_ratios(oracle_items))
    return out


def minimum_detectable(items: Sequence[Mapping], metric: str = "cloze", set_name: str = "forget") -> dict:
    """{mode: `statistics.minimum_detectable_difference` of `metric` on `set_name`} from one model's items."""
    out = {}
    for mode in _modes(items):
        chosen = [r for r in items if r["set"] == set_name and r["mode"] == mode and r["metric"] == metric]
        if chosen:
            out[mode] = st.minimum_detectable_difference([r["value"] for r in chosen], [r["person"] for r in chosen])
    return out


def unlearning_summary(results: Mapping, items: Sequence[Mapping], references: Mapping[str, tuple[Mapping, Sequence]],
                       *, membership: Mapping | None = None, oracle_membership: Mapping | None = None,
                       resamples: int = 1000, seed: int = 0) -> dict:
    """One model's entry. references: {"Vanilla": (results, items), "Oracle": (results, items)} (either may be
    missing, e.g. at 7B without an oracle); membership: `membership.membership_inference` of this model."""
    out: dict = {"vs": {}, "model_utility": utility(results)}
    for name, (_, ref_items) in references.items():
        if ref_items is not items:
            out["vs"][name] = compare(items, ref_items, resamples=resamples, seed=seed)
    if "Vanilla" in references and "Oracle" in references:
        out["progress"] = progress_to_oracle(results, references["Vanilla"][0], references["Oracle"][0])
    if "Oracle" in references:
        out["forget_quality"] = forget_quality(items, references["Oracle"][1])
    if membership:
        out["membership"] = dict(membership)
        if oracle_membership:
            out["privleak"] = {a: privleak(membership[a]["value"], oracle_membership[a]["value"]) for a in ATTACKS}
    return out
