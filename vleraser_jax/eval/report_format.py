"""How report numbers are written: set and mode titles, percent vs ROUGE scales, value [CI] cells that say how
many items and people stand behind a point."""

from __future__ import annotations

import math
from typing import Any, Mapping


SET_TITLES = {"forget": "Forget", "test": "Test", "retain": "Retain", "real": "Real celebrity"}
MODE_TITLES = {"visual": "Visual-QA (image + question)", "textual": "Textual-QA (name in text, no image)"}
# The paper's Table 1 columns per set: classification accuracy, generation ROUGE-L, cloze accuracy.
TABLE_METRICS = (("classification", "Class. acc %"), ("rougeL", "Gen. ROUGE-L"), ("cloze", "Cloze acc %"))
PERCENT_METRICS = {"classification", "cloze", "option_acc", "option_acc_norm"}
METRIC_TITLES = {"classification": "Class. acc %", "cloze": "Cloze acc %", "rougeL": "Gen. ROUGE-L",
                 "option_acc": "Option-LL acc %", "option_acc_norm": "Option-LL acc_norm %", "truth_ratio": "Truth ratio"}


def metric_scale(metric: str) -> tuple[float, int]:
    """(multiplier, decimals): percent with 1 decimal for accuracies, 3 decimals for ROUGE."""
    return (100.0, 1) if metric in PERCENT_METRICS else (1.0, 3)


def is_missing(entry: Mapping[str, Any] | None) -> bool:
    return not entry or entry.get("n", 0) == 0 or math.isnan(entry["value"])


def fmt(entry: Mapping[str, Any] | None, metric: str) -> str:
    """'42.1 [35.0, 49.3]' (percent for accuracies, 3 decimals for ROUGE); an interval of zero width also says
    how many items and people it rests on: '0.0 [0.0, 0.0] (60 items, 15 people)'."""
    if is_missing(entry):
        return "–"
    scale, digits = metric_scale(metric)
    v, lo, hi = (entry[k] * scale for k in ("value", "ci_low", "ci_high"))
    cell = f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    if f"{lo:.{digits}f}" == f"{hi:.{digits}f}":
        people = f", {entry['n_people']} people" if "n_people" in entry else ""
        cell += f" ({entry['n']} items{people})"
    return cell


def fmt_paired(entry: Mapping[str, Any] | None, metric: str) -> str:
    """'−12.5 [−20.1, −5.0] p=0.002' (a paired difference, percentage points for accuracies)."""
    if is_missing(entry):
        return "–"
    scale, digits = metric_scale(metric)
    v, lo, hi = (entry[k] * scale for k in ("value", "ci_low", "ci_high"))
    p = entry.get("p_value")
    p_text = "" if p is None or math.isnan(p) else (" p<0.001" if p < 0.001 else f" p={p:.3f}")
    return f"{v:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{p_text}"


def fmt_value(entry: Mapping[str, Any] | None, metric: str) -> str:
    """'42.1' (the value alone, scaled as in `fmt`)."""
    if is_missing(entry):
        return "–"
    scale, digits = metric_scale(metric)
    return f"{entry['value'] * scale:.{digits}f}"


def markdown_table(methods: Mapping[str, Any], mode: str, metric_columns=TABLE_METRICS) -> str:
    """One row per method, one column per (set, metric): value [95% CI over people]."""
    sets = [s for s in SET_TITLES if any(s in r for r in methods.values())]
    header = ["Method"] + [f"{SET_TITLES[s]}: {title}" for s in sets for _, title in metric_columns]
    rows = [[method] + [fmt(res.get(s, {}).get(mode, {}).get(metric), metric) for s in sets
                        for metric, _ in metric_columns] for method, res in methods.items()]
    return markdown_grid(header, rows)


def fmt_delta(value: float | None, metric: str) -> str:
    """'+15.0' (percentage points for accuracies) or '+0.123' (ROUGE); '–' when missing."""
    if value is None or math.isnan(value):
        return "–"
    scale, digits = metric_scale(metric)
    return f"{value * scale:+.{digits}f}"


def entry_at(results: Mapping | None, set_name: str, mode: str, metric: str):
    return ((results or {}).get(set_name) or {}).get(mode, {}).get(metric)


def delta_at(changes: Mapping | None, set_name: str, mode: str, metric: str) -> float | None:
    return ((changes or {}).get(set_name) or {}).get(mode, {}).get(metric)


def markdown_grid(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
