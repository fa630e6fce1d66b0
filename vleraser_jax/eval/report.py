"""The shared report: results.json, a Markdown table laid out like the paper's Table 1, and plots.

`results.json` maps method -> set -> mode -> metric -> {value, ci_low, ci_high, n}. Each method is added
(or replaced) on its own, so later stages and issues write into the same report; every write rebuilds
the table and plots from the whole file. All files of one write are rendered into a temporary directory
first, so a failure (a full disk included) leaves the previous report as it was.
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


def _read_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a results file written by this project ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
        raise ReportError(f"{path}: not a results file written by this project (no 'methods' object)")
    return data


def fmt(entry: Mapping[str, Any] | None, metric: str) -> str:
    """'42.1 [35.0, 49.3]' (percent for accuracies, 3 decimals for ROUGE)."""
    if not entry or entry.get("n", 0) == 0 or math.isnan(entry["value"]):
        return "–"
    scale, digits = (100.0, 1) if metric in PERCENT_METRICS else (1.0, 3)
    v, lo, hi = (entry[k] * scale for k in ("value", "ci_low", "ci_high"))
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


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


def render_markdown(methods: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> str:
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
    from ..hf import fsync_path, fsync_tree

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
) -> dict[str, Path]:
    """Add (or replace) one method's results, then rewrite results.json, report.md and the plots.

    extra_files: more files of this write (name -> bytes, e.g. predictions), published with the rest.
    Everything is rendered into a temporary directory first; a failure leaves `out_dir` as it was (or
    absent, if it did not exist) and no temporary files behind.
    """
    from ..hf import atomic_directory

    out = Path(out_dir)
    path = out / "results.json"
    stored = _read_results(path) if path.exists() else {"meta": {}, "methods": {}}
    methods = dict(stored["methods"])
    methods[method] = results
    stored_meta = dict(stored.get("meta") or {})
    stored_meta.update(meta or {})

    def render(stage: Path) -> list[str]:
        (stage / "results.json").write_text(json.dumps({"meta": stored_meta, "methods": methods}, indent=2))
        (stage / "report.md").write_text(render_markdown(methods, stored_meta))
        names = ["results.json", "report.md", "forget_vs_retain.png"]
        plot_forget_vs_retain(methods, stage / "forget_vs_retain.png")
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
    files = {"results": path, "markdown": out / "report.md", "forget_vs_retain": out / "forget_vs_retain.png"}
    files.update({n[:-4]: out / n for n in names if n.startswith("sets_")})
    files.update({n: out / n for n in (extra_files or {})})
    return files
