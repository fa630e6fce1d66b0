"""The shared report: results.json, report.md (the paper's Table 1 layout plus what unlearning means measured
against the Oracle) and plots, rewritten atomically after every method.

`results.json` holds `methods` (method -> set -> mode -> metric -> {value, ci_low, ci_high, n, n_people}),
`unlearning` (method -> `eval.unlearning.unlearning_summary`), `diagnostics` (method -> kind -> entry: "reload",
"quantize", "relearn" from `eval/diagnostics.py`, "cost" from the experiment layer) and `meta`. Each method's
per-item scores sit beside it in `items-<method>.jsonl` (`load_items`), so later methods can be paired with
earlier ones on the same items. All files of one write are rendered into a temporary directory first, so a
failure (a full disk included) leaves the previous report as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ..io import atomic_directory, fsync_path, fsync_tree
from .report_format import MODE_TITLES
from .report_plots import plot_forget_vs_utility, plot_sets
from .report_tables import render_markdown


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


def load_unlearning(out_dir) -> dict:
    """method -> unlearning summary ({} for none)."""
    path = Path(out_dir) / "results.json"
    return _read_results(path).get("unlearning", {}) if path.exists() else {}


def items_file(method: str) -> str:
    """The file name of a method's per-item scores."""
    return "items-" + re.sub(r"[^A-Za-z0-9._-]+", "_", method).strip("_") + ".jsonl"


def encode_items(items) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in items).encode()


def load_items(out_dir, method: str) -> list[dict] | None:
    """A method's per-item scores as `write_report` stored them, or None when there are none."""
    path = Path(out_dir) / items_file(method)
    if not path.exists():
        return None
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not a per-item score file written by this project ({e})") from None


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


def _publish(staged: Path, out: Path, names: list[str]) -> None:
    """Move fully written files from `staged` into `out` (same filesystem: each move is one rename).

    results.json goes last: it is the source every write rebuilds from, so even a crash between renames
    leaves a report that the next write makes whole again.
    """
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
    unlearning: Mapping[str, Mapping[str, Any]] | None = None,
    items=None,
) -> dict[str, Path]:
    """Add (or replace) one method's results, then rewrite results.json, report.md and the plots.

    extra_files: more files of this write (name -> bytes, e.g. predictions), published with the rest.
    diagnostics: kind -> entry for this method, merged into its diagnostics in the same write.
    unlearning: method -> unlearning summary to add or replace (this method's, and earlier methods' whose
    references changed). items: this method's per-item scores (`items_file`).
    Everything is rendered into a temporary directory first; a failure leaves `out_dir` as it was (or
    absent, if it did not exist) and no temporary files behind.
    """
    extra = dict(extra_files or {})
    if items is not None:
        extra[items_file(method)] = encode_items(items)
    return _rewrite(out_dir, method, results, diagnostics, meta, extra, unlearning)


def write_diagnostics(out_dir, method: str, entries: Mapping[str, Any], meta: Mapping[str, Any] | None = None
                      ) -> dict[str, Path]:
    """Add (or replace) diagnostics of one method (kind -> entry, e.g. {"reload": ...}), keeping everything
    else; rewrites the report as atomically as `write_report`."""
    if not entries:
        raise ValueError("write_diagnostics: no entries to write")
    return _rewrite(out_dir, method, None, entries, meta, None, None)


def _rewrite(out_dir, method: str, results: Mapping[str, Any] | None, diagnostics: Mapping[str, Any] | None,
             meta: Mapping[str, Any] | None, extra_files: Mapping[str, bytes] | None,
             unlearning: Mapping[str, Any] | None) -> dict[str, Path]:
    """One write: the stored report with `method`'s results (None: kept), diagnostics and unlearning summaries
    merged in, rendered. Plots are redrawn only when results or summaries changed."""
    out = Path(out_dir)
    path = out / "results.json"
    stored = _read_results(path) if path.exists() else {"meta": {}, "methods": {}}
    methods = dict(stored["methods"])
    if results is not None:
        methods[method] = results
    all_diagnostics = {m: dict(kinds) for m, kinds in stored.get("diagnostics", {}).items()}
    if diagnostics:
        all_diagnostics.setdefault(method, {}).update(diagnostics)
    all_unlearning = dict(stored.get("unlearning", {}))
    all_unlearning.update(unlearning or {})
    stored_meta = dict(stored.get("meta") or {})
    stored_meta.update(meta or {})
    redraw = results is not None or bool(unlearning)

    def render(stage: Path) -> list[str]:
        document = {"meta": stored_meta, "methods": methods}
        if all_unlearning:
            document["unlearning"] = all_unlearning
        if all_diagnostics:
            document["diagnostics"] = all_diagnostics
        (stage / "results.json").write_text(json.dumps(document, indent=2))
        (stage / "report.md").write_text(render_markdown(methods, stored_meta, all_diagnostics, all_unlearning))
        names = ["results.json", "report.md"]
        if redraw:
            names += _plots(methods, all_unlearning, stage)
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


def _plots(methods: Mapping[str, Any], unlearning: Mapping[str, Any], stage: Path) -> list[str]:
    """Every plot of the report into `stage`; returns the file names (cloze and option likelihood: the metrics
    that carry information at every scale, unlike the tiny models' letter classification)."""
    names = []
    for metric, tag in (("cloze", "cloze"), ("option_acc", "option")):
        if unlearning and any(metric in m for r in methods.values() for s in r.values() for m in s.values()):
            plot_forget_vs_utility(methods, unlearning, stage / f"forget_vs_utility_{tag}.png", metric)
            names.append(f"forget_vs_utility_{tag}.png")
        for mode in MODE_TITLES:
            if any(metric in s.get(mode, {}) for r in methods.values() for s in r.values()):
                plot_sets(methods, stage / f"sets_{mode}_{tag}.png", metric=metric, mode=mode)
                names.append(f"sets_{mode}_{tag}.png")
    return [n for n in names if (stage / n).exists()]
