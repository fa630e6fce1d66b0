"""The report's Markdown: the protocol's Table 1 (with the Oracle row), then, clearly apart, what unlearning means
measured against the Oracle (`eval.unlearning`), option likelihood, and the diagnostics."""

from __future__ import annotations

import math
from typing import Any, Mapping

from .report_diagnostics import render_diagnostics
from .report_format import (METRIC_TITLES, MODE_TITLES, SET_TITLES, fmt, fmt_paired, markdown_grid, markdown_table)

OPTION_METRICS = (("option_acc", "acc %"), ("option_acc_norm", "acc_norm %"))


def _number(x: float | None, digits: int = 2, percent: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x * 100:.1f}" if percent else f"{x:.{digits}f}"


def _p(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.2g}" if x >= 1e-4 else f"{x:.1e}"


def people_table(methods: Mapping[str, Any]) -> str:
    """How many people and items stand behind each set's numbers (from the first method's cloze and option
    likelihood entries)."""
    first = next(iter(methods.values()), {})
    rows = []
    for s in SET_TITLES:
        for mode in MODE_TITLES:
            modes = first.get(s, {}).get(mode, {})
            if not modes:
                continue
            people = max((e.get("n_people", 0) for e in modes.values()), default=0)
            counts = ", ".join(f"{METRIC_TITLES.get(m, m).split(' ')[0]} {modes[m]['n']}" for m in
                               ("cloze", "rougeL", "classification", "option_acc") if m in modes)
            rows.append([SET_TITLES[s], mode, str(people), counts])
    return markdown_grid(["Set", "Mode", "People", "Items per metric"], rows)


def unlearning_table(unlearning: Mapping[str, Any], methods: Mapping[str, Any], mode: str) -> str:
    """Per method: forget cloze and option likelihood, their paired differences to Vanilla and the Oracle and the
    progress from Vanilla to the Oracle; forget quality, model utility, privleak."""
    header = ["Method"]
    for metric in ("cloze", "option_acc"):
        header += [f"Forget {METRIC_TITLES[metric]}", "Δ vs Vanilla", "Δ vs Oracle", "Progress to Oracle"]
    header += ["Forget quality (KS p)", "Model utility", "privleak LOSS / Min-K%++ (%)"]
    rows = []
    for method, u in unlearning.items():
        cells = [method]
        for metric in ("cloze", "option_acc"):
            cells.append(fmt(methods.get(method, {}).get("forget", {}).get(mode, {}).get(metric), metric))
            for ref in ("Vanilla", "Oracle"):
                cells.append(fmt_paired(u.get("vs", {}).get(ref, {}).get("forget", {}).get(mode, {}).get(metric), metric)
                             if ref != method else "0")
            cells.append(_number(u.get("progress", {}).get(mode, {}).get(f"forget/{metric}")))
        cells.append(_p(u.get("forget_quality", {}).get(mode, {}).get("value")))
        cells.append(_number(u.get("model_utility", {}).get(mode), 3))
        leak = u.get("privleak", {})
        cells.append(" / ".join(_number(leak.get(a), 1) for a in ("loss", "mink_pp")) if leak else "–")
        rows.append(cells)
    return markdown_grid(header, rows)


def utility_table(unlearning: Mapping[str, Any], mode: str) -> str:
    """Per method: the retain, real and test differences to Vanilla (same people, same items)."""
    columns = [(s, m) for s in ("test", "retain", "real") for m in ("cloze", "option_acc", "rougeL")]
    header = ["Method"] + [f"{SET_TITLES[s]} {METRIC_TITLES[m]} Δ vs Vanilla" for s, m in columns]
    rows = [[method] + [fmt_paired(u.get("vs", {}).get("Vanilla", {}).get(s, {}).get(mode, {}).get(m), m)
                        for s, m in columns]
            for method, u in unlearning.items() if "Vanilla" in u.get("vs", {})]
    return markdown_grid(header, rows)


def membership_table(unlearning: Mapping[str, Any]) -> str:
    header = ["Method", "LOSS AUC", "Min-K%++ AUC", "privleak LOSS %", "privleak Min-K%++ %", "Items (forget / holdout)"]
    rows = []
    for method, u in unlearning.items():
        mia = u.get("membership")
        if not mia:
            continue
        leak = u.get("privleak", {})
        auc = lambda a: f"{mia[a]['value']:.3f} [{mia[a]['ci_low']:.3f}, {mia[a]['ci_high']:.3f}]"
        rows.append([method, auc("loss"), auc("mink_pp"), _number(leak.get("loss"), 1), _number(leak.get("mink_pp"), 1),
                     f"{mia['loss']['n_forget']} / {mia['loss']['n_holdout']}"])
    return markdown_grid(header, rows)


def _power_line(unlearning: Mapping[str, Any]) -> str:
    mdd = unlearning.get("Vanilla", {}).get("mdd", {})
    if not mdd:
        return ""
    parts = [f"{mode} {entry['value'] * 100:.1f} points ({entry['n_people']} people)" for mode, entry in mdd.items()
             if not math.isnan(entry["value"])]
    return ("Minimum detectable difference of forget cloze (paired two-sided test, α = 0.05, 80% power, person-level "
            "spread of Vanilla's scores): " + "; ".join(parts) + ".")


def render_unlearning(unlearning: Mapping[str, Any], methods: Mapping[str, Any]) -> list[str]:
    parts = ["", "## Beyond the protocol: unlearning measured against the Oracle", "",
             "The Oracle is the vanilla recipe retrained without the forget (and validation) people: what a model that "
             "never saw them does. Δ: paired differences on the same items and people, [95% CI over people], "
             "person-level permutation p. Progress to Oracle: (Vanilla − method) / (Vanilla − Oracle), 0 = Vanilla, "
             "1 = Oracle. Forget quality: KS-test p-value of the forget truth ratios against the Oracle's (TOFU; high "
             "= indistinguishable). Model utility: harmonic mean of retain and real cloze, ROUGE-L and option-likelihood "
             "accuracy. privleak: membership-inference AUC (forget vs holdout people) relative to the Oracle's."]
    power = _power_line(unlearning)
    if power:
        parts += ["", power]
    for mode, title in MODE_TITLES.items():
        if any(mode in u.get("model_utility", {}) for u in unlearning.values()):
            parts += ["", f"### {title}", "", unlearning_table(unlearning, methods, mode), "",
                      "Utility kept, paired with Vanilla:", "", utility_table(unlearning, mode)]
    if any(u.get("membership") for u in unlearning.values()):
        parts += ["", "### Membership inference (forget vs holdout people)", "", membership_table(unlearning)]
    return parts


def render_markdown(methods: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
                    diagnostics: Mapping[str, Any] | None = None, unlearning: Mapping[str, Any] | None = None) -> str:
    parts = ["# Unlearning report", ""]
    if meta:
        parts += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    parts.append("Each cell: value [95% CI from resampling people, each with all their items]. Forget and Test: lower "
                 "means more forgetting; Retain and Real: higher means more utility kept.")
    if methods:
        parts += ["", "### How many people stand behind each number", "", people_table(methods)]
    parts += ["", "## MLLMU-Bench protocol (Table 1 layout)"]
    for mode, title in MODE_TITLES.items():
        if any(mode in s for r in methods.values() for s in r.values()):
            parts += ["", f"### {title}", "", markdown_table(methods, mode)]
    if unlearning:
        parts += render_unlearning(unlearning, methods)
    if any("option_acc" in m for r in methods.values() for s in r.values() for m in s.values()):
        parts += ["", "## Beyond the protocol: multiple choice by option likelihood", "",
                  "Each option's text scored as the answer to the question (lm-evaluation-harness acc; acc_norm per "
                  "character), the same items as the protocol's letter classification."]
        for mode, title in MODE_TITLES.items():
            parts += ["", f"### {title}", "", markdown_table(methods, mode, OPTION_METRICS)]
    if diagnostics:
        parts += ["", render_diagnostics(diagnostics, list(methods))]
    return "\n".join(parts).rstrip() + "\n"
