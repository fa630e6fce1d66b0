"""The report's diagnostic, attack and cost tables (issue #7's reload, quantization and relearning entries)."""

from __future__ import annotations

import json
from typing import Mapping

from .report_format import (MODE_TITLES, SET_TITLES, TABLE_METRICS, delta_at, entry_at, fmt, fmt_delta, fmt_value,
                            markdown_grid)


COST_REFERENCE = "NPO"  # the paper states its training cost relative to NPO's
QUANT_TITLES = {8: "int8", 4: "4-bit"}


def _with(diagnostics: Mapping, kind: str, order: list[str], skipped: bool = False) -> list[tuple[str, Mapping]]:
    """(method, entry) of `kind` in `order`: the entries that ran, or (skipped=True) those recorded as skipped."""
    return [(m, diagnostics[m][kind]) for m in order
            if kind in diagnostics.get(m, {}) and ("skipped" in diagnostics[m][kind]) == skipped]


def _has_mode(entry_results: Mapping, mode: str) -> bool:
    return any(mode in modes for modes in entry_results.values())


def reload_table(diagnostics: Mapping, mode: str, order: list[str]) -> str:
    """One row per method and metric: forget score unlearned, with the vanilla projector / vision tower, recovery."""
    header = ["Method", "Metric", "Unlearned", "+ vanilla projector", "Recovery", "+ vanilla vision", "Recovery"]
    rows = []
    for method, e in _with(diagnostics, "reload", order):
        if not _has_mode(e["unlearned"], mode):
            continue
        for metric, title in TABLE_METRICS:
            cells = [method, title, fmt(entry_at(e["unlearned"], "forget", mode, metric), metric)]
            for which in ("projector", "vision"):
                cells += [fmt(entry_at(e.get(which), "forget", mode, metric), metric),
                          fmt_delta(delta_at(e["recovery"].get(which), "forget", mode, metric), metric)]
            rows.append(cells)
    return markdown_grid(header, rows)


def quantize_table(diagnostics: Mapping, mode: str, order: list[str]) -> str:
    """One row per method, set (forget, retain) and metric: full precision, each quantization, its change."""
    entries = _with(diagnostics, "quantize", order)
    bits = [b for b in QUANT_TITLES if any(b in e.get("bits", ()) for _, e in entries)]
    header = ["Method", "Set", "Metric", "Unlearned"] + [c for b in bits for c in (QUANT_TITLES[b], "Δ")]
    rows = []
    for method, e in entries:
        for set_name in ("forget", "retain"):
            if mode not in e["unlearned"].get(set_name, {}):
                continue
            for metric, title in TABLE_METRICS:
                cells = [method, SET_TITLES[set_name], title, fmt(entry_at(e["unlearned"], set_name, mode, metric), metric)]
                for b in bits:
                    cells += [fmt(entry_at(e.get(f"int{b}"), set_name, mode, metric), metric),
                              fmt_delta(delta_at(e["change"].get(f"int{b}"), set_name, mode, metric), metric)]
                rows.append(cells)
    return markdown_grid(header, rows)


def relearn_table(diagnostics: Mapping, mode: str, order: list[str]) -> str:
    """One row per method and metric: forget score on half A (fine-tuned on) and B (held out), before/after."""
    header = ["Method", "Metric", "A (trained on): unlearned", "A: relearned", "A: recovery",
              "B (held out): unlearned", "B: relearned", "B: recovery"]
    rows = []
    for method, e in _with(diagnostics, "relearn", order):
        if not _has_mode(e["unlearned"]["A"], mode):
            continue
        for metric, title in TABLE_METRICS:
            cells = [method, title]
            for g in ("A", "B"):
                cells += [fmt(entry_at(e["unlearned"].get(g), "forget", mode, metric), metric),
                          fmt(entry_at(e["relearned"].get(g), "forget", mode, metric), metric),
                          fmt_delta(delta_at(e["recovery"].get(g), "forget", mode, metric), metric)]
            rows.append(cells)
    return markdown_grid(header, rows)


def summary_table(diagnostics: Mapping, mode: str, order: list[str], metric: str = "cloze") -> str:
    """One row per method, one metric, every diagnostic side by side: the forget score unlearned, with vanilla
    modules reloaded, quantized, and after relearning (A: the people fine-tuned on; B: held out). Cells are
    values only (the per-diagnostic tables below carry the CIs); '–' where a diagnostic did not run."""
    title = dict(TABLE_METRICS)[metric]
    header = ["Method", f"Forget {title}: unlearned", "+ vanilla projector", "+ vanilla vision", *QUANT_TITLES.values(),
              "Relearn A: before → after", "Relearn B: before → after"]
    value = lambda results, set_name="forget": fmt_value(entry_at(results, set_name, mode, metric), metric)
    rows = []
    for method in order:
        kinds = {k: e for k, e in diagnostics.get(method, {}).items() if isinstance(e, Mapping) and "skipped" not in e}
        reload, quantize, relearn = kinds.get("reload"), kinds.get("quantize"), kinds.get("relearn")
        base = next((e["unlearned"] for e in (reload, quantize) if e), None)
        if base is None and relearn is None:
            continue
        row = [method, value(base)]
        row += [value(reload.get(which)) if reload else "–" for which in ("projector", "vision")]
        row += [value(quantize.get(f"int{b}")) if quantize and b in quantize.get("bits", ()) else "–" for b in QUANT_TITLES]
        row += [f"{value(relearn['unlearned'].get(g))} → {value(relearn['relearned'].get(g))}" if relearn else "–"
                for g in ("A", "B")]
        rows.append(row)
    return markdown_grid(header, rows)


def cost_ratios(diagnostics: Mapping, reference: str = COST_REFERENCE) -> dict[str, float | None]:
    """Each method's wall time / the reference's, only where both were measured in the same run (same machine
    and load); None otherwise."""
    ref = diagnostics.get(reference, {}).get("cost")
    out = {}
    for method, kinds in diagnostics.items():
        cost = kinds.get("cost")
        same_run = cost and ref and cost.get("run") == ref.get("run") and ref["wall_seconds"] > 0
        out[method] = cost["wall_seconds"] / ref["wall_seconds"] if same_run else None
    return out


def _concurrency_note(diagnostics: Mapping) -> str:
    """Said under the cost table when its methods ran several at once: each shared the cores with another."""
    workers = max((kinds["cost"].get("concurrent_workers", 1) for kinds in diagnostics.values() if "cost" in kinds),
                  default=1)
    if workers <= 1:
        return ""
    return (f" These methods ran {workers} at a time on worker processes sharing the cores, so each wall time "
            f"includes waiting for the cores and the ratios are rougher; `bench/cost_passes.py` times methods alone.")


def cost_table(diagnostics: Mapping, order: list[str], reference: str = COST_REFERENCE) -> str:
    ratios = cost_ratios(diagnostics, reference)
    header = ["Method", "Wall time (s)", f"× {reference} (same run)", "Parts (s)"]
    rows = []
    for method, cost in _with(diagnostics, "cost", order):
        parts = ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in cost.get("parts", {}).items())
        ratio = ratios.get(method)
        rows.append([method, f"{cost['wall_seconds']:.1f}", "–" if ratio is None else f"{ratio:.2f}", parts or "–"])
    return markdown_grid(header, rows)


def _baseline_results(kind: str, entry: Mapping) -> Mapping:
    """The unlearned model's results inside a diagnostic entry (the relearning attack keeps one per half)."""
    return entry["unlearned"]["A"] if kind == "relearn" else entry["unlearned"]


def _relearn_intro(entries: list[tuple[str, Mapping]]) -> str:
    first = entries[0][1]
    same = len({json.dumps(e["settings"], sort_keys=True) for _, e in entries}) == 1
    settings = (", ".join(f"{k} {v}" for k, v in first["settings"].items()) if same
                else "settings differ between methods: see results.json")
    return (f"The forget people split into halves A ({', '.join(first['people']['A'])}) and B "
            f"({', '.join(first['people']['B'])}); each unlearned model fine-tuned on A's forget QA rows ({settings}). "
            "Recovery = relearned − unlearned: on B (never trained on) it means the knowledge was suppressed, "
            "not removed.")


def _reload_intro(entries: list[tuple[str, Mapping]]) -> str:
    unchanged = [f"{method} ({', '.join(e['unchanged'])})" for method, e in entries if e.get("unchanged")]
    return ("The unlearned model with the vanilla model's multimodal projector, or its vision tower, put back. "
            "Recovery = swapped − unlearned (percentage points for accuracies): a large recovery means the method "
            "broke vision↔language alignment instead of removing the knowledge. Textual-QA shows no image, so its "
            "recovery is zero by construction (a check)."
            + (" Modules a method left bit-identical to Vanilla's give back the unlearned model itself, so they are "
               f"not scored again and recover exactly 0: {'; '.join(unchanged)}." if unchanged else ""))


# kind -> (section title, introduction (a string, or a function of the entries), table function)
DIAGNOSTIC_SECTIONS = {
    "reload": ("Diagnostic: vanilla modules reloaded (forget set)", _reload_intro, reload_table),
    "quantize": ("Attack: weight quantization",
                 "Weight-only symmetric per-output-channel round-to-nearest (Dense kernels and embeddings; norms and "
                 "biases in full precision). Δ = quantized − unlearned; on the forget set a rise means rounding "
                 "undid the unlearning.", quantize_table),
    "relearn": ("Attack: relearning", _relearn_intro, relearn_table),
}


def render_diagnostics(diagnostics: Mapping, order: list[str] | None = None) -> str:
    """The diagnostic, attack and cost tables (Markdown) of every method that has them, methods in `order`
    first (the main table's), then the rest."""
    order = list(order or [])
    order += [m for m in diagnostics if m not in order]
    parts = []
    if any(_with(diagnostics, kind, order) for kind in DIAGNOSTIC_SECTIONS):
        parts += ["## Diagnostics and attacks at a glance (forget set, cloze)", "",
                  "Each diagnostic's forget cloze side by side; the sections below give every metric with its CI."]
        for mode in MODE_TITLES:
            parts += ["", f"### {MODE_TITLES[mode]}", "", summary_table(diagnostics, mode, order)]
        parts.append("")
    for kind, (title, intro, table) in DIAGNOSTIC_SECTIONS.items():
        entries, skipped = _with(diagnostics, kind, order), _with(diagnostics, kind, order, skipped=True)
        if not entries and not skipped:
            continue
        parts.append(f"## {title}")
        if entries:
            parts += ["", intro(entries) if callable(intro) else intro]
        if skipped:
            parts += ["", "Not run for " + "; ".join(f"{m} ({e['skipped']})" for m, e in skipped) + "."]
        for mode in MODE_TITLES:
            if entries and any(_has_mode(_baseline_results(kind, e), mode) for _, e in entries):
                parts += ["", f"### {MODE_TITLES[mode]}", "", table(diagnostics, mode, order)]
        parts.append("")
    if _with(diagnostics, "cost", order):
        parts += ["## Cost", "",
                  f"Wall time of each method's run (its statistics, training, deletion or merge, and export), and its "
                  f"ratio to {COST_REFERENCE}'s when both ran in the same invocation.{_concurrency_note(diagnostics)}",
                  "", cost_table(diagnostics, order), ""]
    return "\n".join(parts).rstrip() + "\n"
