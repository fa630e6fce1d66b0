"""Running a configured experiment: the reference models (Vanilla, Oracle) -> each method -> evaluation,
comparisons with the references, membership inference, diagnostics -> the report; and where each method's
settings came from (the selection results)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Sequence

from ..eval.diagnostics import diagnostics_settings
from ..eval.report import load_diagnostics
from ..train.workspace import tensorboard_on
from .method_pool import run_methods_in_workers
from .methods import effective_settings, method_title, section
from .pipeline import prepare_experiment, report_dir_for, run_one_method


def selection_dir(c) -> Path:
    """Where `vleraser sweep` keeps each method's selection result (<report>/selection/<method>.json)."""
    return report_dir_for(c) / "selection"


def load_selections(c, root: Path | None = None) -> dict[str, dict]:
    """Every method's stored selection result for this config's report (or in `root`)."""
    root = selection_dir(c) if root is None else root
    return {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json")) if p.name != "references.json"}


def committed_selection_dir(c) -> Path | None:
    """results/<report>/selection/ of this source tree, where the selection behind the configs' settings is committed
    (a fresh clone has no work-dir selection of its own); None when absent (e.g. an installed wheel)."""
    path = Path(__file__).resolve().parents[2] / "results" / report_dir_for(c).name / "selection"
    return path if path.is_dir() and path.resolve() != selection_dir(c).resolve() else None


def selection_summary(c, methods: Sequence[str]) -> str:
    """One line for the report header: how each run method's settings were chosen."""
    stored, where = load_selections(c), "selection/selection.md"
    committed = committed_selection_dir(c)
    if not stored.keys() & set(methods) and committed is not None:
        stored = load_selections(c, committed)
        where = f"results/{committed.parent.name}/selection/selection.md, committed (this run did not select)"
    parts = []
    for method in methods:
        sel = stored.get(method)
        if sel is None:
            continue
        what = (f"chosen of {len(sel['rows'])} ({sel['eligible']} eligible)" if sel["chosen"] is not None
                else f"none of {len(sel['rows'])} eligible, frontier shown")
        parts.append(f"{method}: {what}{config_mismatch(c, method, sel)}")
    if not parts:
        return "the config's settings (no selection results in selection/)"
    return "; ".join(parts) + f" — every setting in {where}"


def config_mismatch(c, method: str, sel: dict) -> str:
    """", but the config runs k=v (selected v')" where the config does not run the stored choice as the reported
    run applies it (its `run_setting`: a baseline at the optimizer steps it ran on the validation people); else ""."""
    if sel.get("chosen") is None:
        return ""
    row = sel["rows"][sel["chosen"]]
    chosen, running = row.get("run_setting", row["setting"]), effective_settings(c, method)
    differ = [f"{k}={running.get(k)} (selected {v})" for k, v in sorted(chosen.items()) if running.get(k) != v]
    return f", but the config runs {', '.join(differ)}" if differ else ""


def run_experiment(c, methods: Sequence[str], *, diagnostics: dict | None = None, workers: int = 1,
                   log=print) -> Path:
    """References (cached) -> each method -> evaluation -> summaries -> diagnostics -> the shared report;
    returns its directory.

    diagnostics: settings over the config's `diagnostics` section (`eval.diagnostics.DIAGNOSTICS_DEFAULTS`
    when it has none), e.g. {"relearn": False}. Each method's wall time is always recorded (the cost table).
    workers: methods run on this many processes at once (`method_pool`), each writing its own log; the report
    holds the same numbers and the methods in the same order as with 1.
    """
    settings = diagnostics_settings(section(c, "diagnostics"), diagnostics)  # bad settings fail before any work
    tensorboard_on(c)  # fails early when TensorBoard logging is on without tensorboardX
    exp = prepare_experiment(c, log)
    exp.meta["settings"] = selection_summary(c, methods)
    done = load_diagnostics(exp.report_dir)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"  # "the same run" of the cost ratios
    workers = min(workers, len(methods))
    if workers > 1:
        run_methods_in_workers(exp, methods, settings, done, run_id, workers, log)
    else:
        timings = {}
        for method in methods:
            log(f"== {method}")
            run_one_method(exp, method, settings, done.get(method_title(c, method), {}), run_id, timings,
                           exp.report_dir, log)
    log(exp.timings.table())
    log(f"report: {exp.report_dir / 'report.md'}")
    return exp.report_dir
