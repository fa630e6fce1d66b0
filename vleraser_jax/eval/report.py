"""The shared report: results.json, a Markdown table laid out like the paper's Table 1, and plots.

`results.json` maps method -> set -> mode -> metric -> {value, ci_low, ci_high, n}. Each method is added
(or replaced) on its own, so later stages and issues write into the same report; every write rebuilds
the table and plots from the whole file. All files of one write are rendered into a temporary directory
first, so a failure (a full disk included) leaves the previous report as it was.

A separate top-level key, `diagnostics`, maps method -> kind -> entry for the diagnostics and attacks of
issue #7 (`eval/diagnostics.py` writes "reload", "quantize", "relearn"; `unlearn/run.py` writes "cost"),
rendered as extra tables after the main ones. `load_results` still returns the methods only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

SET_TITLES = {"forget": "Forget", "test": "Test", "retain": "Retain", "real": "Real celebrity"}
MODE_TITLES = {"visual": "Visual-QA (image + question)", "textual": "Textual-QA (name in text, no image)"}
# The paper's Table 1 columns per set: classification accuracy, generation ROUGE-L, cloze accuracy.
TABLE_METRICS = (("classification", "Class. acc %"), ("rougeL", "Gen. ROUGE-L"), ("cloze", "Cloze acc %"))
PERCENT_METRICS = {"classification", "classification_loglik", "cloze"}


class ReportError(ValueError):
    """A report that cannot be read or written; the message names the file."""


def load_results(out_dir) -> dict:
    path = Path(out_dir) / "results.json"
    if not path.exists():
        return {}
    return _read_results(path)["methods"]


def load_diagnostics(out_dir) -> dict:
    """method -> kind -> entry, as `write_diagnostics` stored them ({} for none)."""
    path = Path(out_dir) / "results.json"
    if not path.exists():
        return {}
    return _read_results(path).get("diagnostics", {})


def _read_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a results file written by this project ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
        raise ReportError(f"{path}: not a results file written by this project (no 'methods' object)")
    diagnostics = data.get("diagnostics", {})
    if not isinstance(diagnostics, dict) or not all(isinstance(v, dict) for v in diagnostics.values()):
        raise ReportError(f"{path}: 'diagnostics' must map each method to an object of diagnostics")
    return data


def _scale(metric: str) -> tuple[float, int]:
    """(multiplier, decimals): percent with 1 decimal for accuracies, 3 decimals for ROUGE."""
    return (100.0, 1) if metric in PERCENT_METRICS else (1.0, 3)


def _missing(entry: Mapping[str, Any] | None) -> bool:
    return not entry or entry.get("n", 0) == 0 or math.isnan(entry["value"])


def fmt(entry: Mapping[str, Any] | None, metric: str) -> str:
    """'42.1 [35.0, 49.3]' (percent for accuracies, 3 decimals for ROUGE)."""
    if _missing(entry):
        return "–"
    scale, digits = _scale(metric)
    v, lo, hi = (entry[k] * scale for k in ("value", "ci_low", "ci_high"))
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_value(entry: Mapping[str, Any] | None, metric: str) -> str:
    """'42.1' (the value alone, scaled as in `fmt`)."""
    if _missing(entry):
        return "–"
    scale, digits = _scale(metric)
    return f"{entry['value'] * scale:.{digits}f}"


def markdown_table(methods: Mapping[str, Any], mode: str, metric_columns=TABLE_METRICS) -> str:
    sets = [s for s in SET_TITLES if any(s in r for r in methods.values())]
    header = ["Method"] + [f"{SET_TITLES[s]}: {title}" for s in sets for _, title in metric_columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, res in methods.items():
        cells = [method]
        for s in sets:
            for metric, _ in metric_columns:
                cells.append(fmt(res.get(s, {}).get(mode, {}).get(metric), metric))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(methods: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
                    diagnostics: Mapping[str, Any] | None = None) -> str:
    parts = ["# Unlearning report", ""]
    if meta:
        parts += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    parts.append(
        "Each cell: value [95% bootstrap CI]. Forget and Test: lower means more forgetting; Retain and "
        "Real: higher means more utility kept. n per cell is in results.json."
    )
    for mode, title in MODE_TITLES.items():
        if any(mode in s for r in methods.values() for s in r.values()):
            parts += ["", f"## {title}", "", markdown_table(methods, mode)]
    has_loglik = any("classification_loglik" in m for r in methods.values() for s in r.values() for m in s.values())
    if has_loglik:
        parts += ["", "## Extra (not the protocol's): classification by option log-likelihood", ""]
        for mode, title in MODE_TITLES.items():
            parts += [f"### {title}", "", markdown_table(methods, mode, (("classification_loglik", "LL acc %"),)), ""]
    if diagnostics:
        parts += ["", render_diagnostics(diagnostics, list(methods))]
    return "\n".join(parts).rstrip() + "\n"


# ------------------------------------------------------------------ diagnostics and attacks (issue #7)

COST_REFERENCE = "NPO"  # the paper states its training cost relative to NPO's
QUANT_TITLES = {8: "int8", 4: "4-bit"}


def fmt_delta(value: float | None, metric: str) -> str:
    """'+15.0' (percentage points for accuracies) or '+0.123' (ROUGE); '–' when missing."""
    if value is None or math.isnan(value):
        return "–"
    scale, digits = _scale(metric)
    return f"{value * scale:+.{digits}f}"


def _entry(results: Mapping | None, set_name: str, mode: str, metric: str):
    return ((results or {}).get(set_name) or {}).get(mode, {}).get(metric)


def _delta(changes: Mapping | None, set_name: str, mode: str, metric: str) -> float | None:
    return ((changes or {}).get(set_name) or {}).get(mode, {}).get(metric)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


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
            cells = [method, title, fmt(_entry(e["unlearned"], "forget", mode, metric), metric)]
            for which in ("projector", "vision"):
                cells += [fmt(_entry(e.get(which), "forget", mode, metric), metric),
                          fmt_delta(_delta(e["recovery"].get(which), "forget", mode, metric), metric)]
            rows.append(cells)
    return _table(header, rows)


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
                cells = [method, SET_TITLES[set_name], title, fmt(_entry(e["unlearned"], set_name, mode, metric), metric)]
                for b in bits:
                    cells += [fmt(_entry(e.get(f"int{b}"), set_name, mode, metric), metric),
                              fmt_delta(_delta(e["change"].get(f"int{b}"), set_name, mode, metric), metric)]
                rows.append(cells)
    return _table(header, rows)


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
                cells += [fmt(_entry(e["unlearned"].get(g), "forget", mode, metric), metric),
                          fmt(_entry(e["relearned"].get(g), "forget", mode, metric), metric),
                          fmt_delta(_delta(e["recovery"].get(g), "forget", mode, metric), metric)]
            rows.append(cells)
    return _table(header, rows)


def summary_table(diagnostics: Mapping, mode: str, order: list[str], metric: str = "cloze") -> str:
    """One row per method, one metric, every diagnostic side by side: the forget score unlearned, with vanilla
    modules reloaded, quantized, and after relearning (A: the people fine-tuned on; B: held out). Cells are
    values only (the per-diagnostic tables below carry the CIs); '–' where a diagnostic did not run."""
    title = dict(TABLE_METRICS)[metric]
    header = ["Method", f"Forget {title}: unlearned", "+ vanilla projector", "+ vanilla vision", *QUANT_TITLES.values(),
              "Relearn A: before → after", "Relearn B: before → after"]
    value = lambda results, set_name="forget": fmt_value(_entry(results, set_name, mode, metric), metric)
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
    return _table(header, rows)


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


def cost_table(diagnostics: Mapping, order: list[str], reference: str = COST_REFERENCE) -> str:
    ratios = cost_ratios(diagnostics, reference)
    header = ["Method", "Wall time (s)", f"× {reference} (same run)", "Parts (s)"]
    rows = []
    for method, cost in _with(diagnostics, "cost", order):
        parts = ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in cost.get("parts", {}).items())
        ratio = ratios.get(method)
        rows.append([method, f"{cost['wall_seconds']:.1f}", "–" if ratio is None else f"{ratio:.2f}", parts or "–"])
    return _table(header, rows)


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


# kind -> (section title, introduction (a string, or a function of the entries), table function)
DIAGNOSTIC_SECTIONS = {
    "reload": ("Diagnostic: vanilla modules reloaded (forget set)",
               "The unlearned model with the vanilla model's multimodal projector, or its vision tower, put back. "
               "Recovery = swapped − unlearned (percentage points for accuracies): a large recovery means the "
               "method broke vision↔language alignment instead of removing the knowledge. Textual-QA shows no "
               "image, so its recovery is zero by construction (a check).", reload_table),
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
                  f"ratio to {COST_REFERENCE}'s when both ran in the same invocation.", "",
                  cost_table(diagnostics, order), ""]
    return "\n".join(parts).rstrip() + "\n"


def plot_forget_vs_retain(methods: Mapping[str, Any], path: Path, metric: str = "classification") -> None:
    """One panel per mode: forget score (x, lower is better) vs retain score (y, higher is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODE_TITLES if any(m in s for r in methods.values() for s in r.values())]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.5), squeeze=False)
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    for ax, mode in zip(axes[0], modes):
        for method, res in methods.items():
            f = res.get("forget", {}).get(mode, {}).get(metric)
            r = res.get("retain", {}).get(mode, {}).get(metric)
            if not f or not r or not f.get("n") or not r.get("n"):
                continue
            x, y = f["value"] * scale, r["value"] * scale
            ax.errorbar(
                x, y,
                xerr=[[x - f["ci_low"] * scale], [f["ci_high"] * scale - x]],
                yerr=[[y - r["ci_low"] * scale], [r["ci_high"] * scale - y]],
                fmt="o", capsize=3, label=method,
            )
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if metric in ("classification", "classification_loglik"):
            ax.axvline(25.0, color="grey", ls="--", lw=0.8)
            ax.axhline(25.0, color="grey", ls="--", lw=0.8, label="chance (4 options)")
        unit = " (%)" if scale == 100.0 else ""
        ax.set_xlabel(f"forget {metric}{unit}  (lower = more forgotten)")
        ax.set_ylabel(f"retain {metric}{unit}  (higher = utility kept)")
        ax.set_title(MODE_TITLES[mode])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def plot_sets(methods: Mapping[str, Any], path: Path, metric: str = "classification", mode: str = "visual") -> None:
    """Grouped bars: each method's score on every set, with CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets = [s for s in SET_TITLES if any(s in r for r in methods.values())]
    names = list(methods)
    width = 0.8 / max(len(names), 1)
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(sets) * max(1, len(names) / 3)), 4.2))
    for k, method in enumerate(names):
        vals, lows, highs = [], [], []
        for s in sets:
            e = methods[method].get(s, {}).get(mode, {}).get(metric)
            ok = e and e.get("n")
            vals.append(e["value"] * scale if ok else np.nan)
            lows.append((e["value"] - e["ci_low"]) * scale if ok else 0)
            highs.append((e["ci_high"] - e["value"]) * scale if ok else 0)
        ax.bar(np.arange(len(sets)) + k * width, vals, width, yerr=[lows, highs], capsize=2, label=method)
    if metric in ("classification", "classification_loglik"):
        ax.axhline(25.0, color="grey", ls="--", lw=0.8, label="chance (4 options)")
    ax.set_xticks(np.arange(len(sets)) + width * (len(names) - 1) / 2, [SET_TITLES[s] for s in sets])
    ax.set_ylabel(f"{metric}{' (%)' if scale == 100.0 else ''}")
    ax.set_title(f"{metric} by set — {MODE_TITLES[mode]}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _publish(staged: Path, out: Path, names: list[str]) -> None:
    """Move fully written files from `staged` into `out` (same filesystem: each move is one rename).

    results.json goes last: it is the source every write rebuilds from, so even a crash between renames
    leaves a report that the next write makes whole again.
    """
    from ..io import fsync_path, fsync_tree

    fsync_tree(staged)
    for name in sorted(names, key=lambda n: n == "results.json"):
        os.replace(staged / name, out / name)
    fsync_path(out)


def write_report(
    out_dir,
    method: str,
    results: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    diagnostics: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Add (or replace) one method's results, then rewrite results.json, report.md and the plots.

    extra_files: more files of this write (name -> bytes, e.g. predictions), published with the rest.
    diagnostics: kind -> entry for this method, merged into its diagnostics in the same write.
    Everything is rendered into a temporary directory first; a failure leaves `out_dir` as it was (or
    absent, if it did not exist) and no temporary files behind.
    """
    return _rewrite(out_dir, method, results, diagnostics, meta, extra_files)


def write_diagnostics(out_dir, method: str, entries: Mapping[str, Any], meta: Mapping[str, Any] | None = None
                      ) -> dict[str, Path]:
    """Add (or replace) diagnostics of one method (kind -> entry, e.g. {"reload": ...}), keeping everything
    else; rewrites the report as atomically as `write_report`."""
    if not entries:
        raise ValueError("write_diagnostics: no entries to write")
    return _rewrite(out_dir, method, None, entries, meta, None)


def _rewrite(out_dir, method: str, results: Mapping[str, Any] | None, diagnostics: Mapping[str, Any] | None,
             meta: Mapping[str, Any] | None, extra_files: Mapping[str, bytes] | None) -> dict[str, Path]:
    """One write: the stored report with `method`'s results (None: kept) and diagnostics merged in, rendered."""
    from ..io import atomic_directory

    out = Path(out_dir)
    path = out / "results.json"
    stored = _read_results(path) if path.exists() else {"meta": {}, "methods": {}}
    methods = dict(stored["methods"])
    if results is not None:
        methods[method] = results
    all_diagnostics = {m: dict(kinds) for m, kinds in stored.get("diagnostics", {}).items()}
    if diagnostics:
        all_diagnostics.setdefault(method, {}).update(diagnostics)
    stored_meta = dict(stored.get("meta") or {})
    stored_meta.update(meta or {})

    def render(stage: Path) -> list[str]:
        document = {"meta": stored_meta, "methods": methods}
        if all_diagnostics:  # files without diagnostics stay exactly as before issue #7
            document["diagnostics"] = all_diagnostics
        (stage / "results.json").write_text(json.dumps(document, indent=2))
        (stage / "report.md").write_text(render_markdown(methods, stored_meta, all_diagnostics))
        names = ["results.json", "report.md"]
        if methods:  # diagnostics may arrive before any method's results: nothing to plot yet
            plot_forget_vs_retain(methods, stage / "forget_vs_retain.png")
            names.append("forget_vs_retain.png")
        for mode in MODE_TITLES:
            if any(mode in s for r in methods.values() for s in r.values()):
                plot_sets(methods, stage / f"sets_{mode}.png", mode=mode)
                names.append(f"sets_{mode}.png")
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in (".", ".."):
                raise ReportError(f"extra report file {name!r}: expected a plain file name")
            (stage / name).write_bytes(data)
            names.append(name)
        return names

    existed = out.exists()
    try:
        if not existed:  # a new report directory appears whole, in one rename
            with atomic_directory(out) as stage:
                names = render(stage)
        else:
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            try:
                names = render(stage)
                _publish(stage, out, names)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    except OSError as e:  # e.g. a full disk
        kept = "the previous report files are unchanged" if existed else "nothing was written"
        raise ReportError(f"{out}: writing the report failed ({e}); {kept}") from e
    files = {"results": path, "markdown": out / "report.md"}
    files.update({n[:-4]: out / n for n in names if n.endswith(".png") and n not in (extra_files or {})})
    files.update({n: out / n for n in (extra_files or {})})
    return files
