"""Methods at matched doses: the same learning rate and the same optimizer steps for every method, on the reported
forget people, compared pair by pair on the same people and items.

The selection (`sweep`) gives each method its own dose, so two methods' reported rows can differ only because
their doses differ, or look alike because the chosen doses happen to land them at the same place. Here the dose is
held fixed and only the update rule varies: e.g. NPO's weight 2σ(−β·log-ratio) on each sequence's ascent step
against GA's constant one. Nothing is chosen from these runs; they are read as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from itertools import combinations
from pathlib import Path

from tqdm.auto import tqdm

from ..eval.evaluate import evaluate
from ..eval.report_dose import compare_rows, write_dose_report
from ..io import append_record, read_records, write_bytes_atomic
from ..unlearn.baselines import BASELINES
from .methods import METHODS, eval_config, method_title, run_method, with_method_settings
from .pipeline import load_vanilla, open_experiment, report_dir_for, run_stages

STUDY_SETS = ("forget", "retain", "real")


def study_eval_config(c, max_people: int):
    """Cloze and option-likelihood accuracy (the selection's metrics, the ones that measure knowledge on these
    models) on forget, retain and real, both modes, at most `max_people` per set."""
    return dataclasses.replace(eval_config(c), tasks=("cloze",), option_likelihood=True, sets=STUDY_SETS,
                               max_people=max_people or None)


def dose_setting(method: str, learning_rate: float, steps: int) -> dict:
    """The setting that runs `method` at exactly `steps` optimizer steps at `learning_rate` (a baseline's epochs
    dropped; VL-Eraser counts steps already)."""
    if method in METHODS:
        return {"learning_rate": learning_rate, "steps": steps}
    if method in BASELINES:
        return {"learning_rate": learning_rate, "steps": steps, "epochs": None}
    raise ValueError(f"unknown method {method!r}")


def study_dir(c) -> Path:
    return report_dir_for(c) / "dose_study"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_dose_study(methods, learning_rate: float, steps) -> str:
    return (f"dose study: {', '.join(methods)} at learning rate {learning_rate:g} and {', '.join(map(str, steps))} "
            f"optimizer steps ({len(methods) * len(steps)} runs, each unlearned from the vanilla model and scored on "
            f"forget, retain and real), then every pair compared at equal dose")


def run_dose_study(c, methods, learning_rate: float, steps, *, max_people: int = 30, log=print) -> dict:
    """Every method at every step count (see the module docstring); runs a previous, killed study finished are
    reused (`<report>/dose_study/runs.jsonl`). Returns the study: references, rows (with per-item scores) and the
    paired comparisons of every pair of methods at each dose."""
    methods = list(dict.fromkeys(methods))  # each method once, in the order given
    if len(methods) < 2:
        raise ValueError(f"a dose study compares at least two methods, got {methods}")
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"steps must be positive integers, got {steps}")
    vanilla_dir, oracle_dir = run_stages(c, log)
    exp = open_experiment(c, vanilla_dir, oracle_dir, log)
    ecfg = study_eval_config(c, max_people)
    base_key = _key(str(vanilla_dir), str(oracle_dir), dataclasses.asdict(ecfg))
    journal = study_dir(c) / "runs.jsonl"
    done = read_records(journal)

    def scored(run_key: str, what: str, params_fn, extra: dict) -> dict:
        if run_key in done:
            return done[run_key]
        t0 = time.perf_counter()
        params = params_fn()
        result = evaluate(exp.model, params, exp.processor, exp.bench, ecfg)
        row = {**extra, "results": result.results, "items": result.items, "seconds": time.perf_counter() - t0}
        append_record(journal, run_key, row)
        log(f"  {what}: done in {row['seconds']:.0f} s")
        return row

    references = {"Vanilla": scored(_key(base_key, "Vanilla"), "Vanilla", lambda: exp.vanilla, {})}
    if oracle_dir is not None:
        references["Oracle"] = scored(_key(base_key, "Oracle"), "Oracle", lambda: load_vanilla(c, oracle_dir)[1], {})
    rows = []
    for method in tqdm(methods, desc="dose study", unit="method", leave=False):
        for n in steps:
            setting = dose_setting(method, learning_rate, n)
            cs = with_method_settings(c, method, setting)
            run_key = _key(base_key, method, cs.to_dict())
            run = lambda cs=cs, method=method: run_method(cs, method, exp.model, exp.vanilla, exp.processor, exp.bench,
                                                          log=lambda *_: None).params
            rows.append(scored(run_key, f"{method} at {n} steps", run,
                               {"method": method, "steps": n, "learning_rate": learning_rate}))
    by = {(r["method"], r["steps"]): r for r in rows}
    comparisons = [{"first": a, "second": b, "steps": n,
                    "differences": compare_rows(by[(a, n)], by[(b, n)], seed=c.seed)}
                   for n in steps for a, b in combinations(methods, 2)]
    return {"learning_rate": learning_rate, "steps": steps, "methods": methods,
            "forget_people": len(exp.bench.forget), "references": references, "rows": rows,
            "comparisons": comparisons, "titles": {m: method_title(c, m) for m in methods}}


def write_dose_study(c, study: dict) -> Path:
    """`dose_study.json` (every number, the per-item scores left out) beside the report's table and plot."""
    out = study_dir(c)
    slim = {**study, "references": {k: {"results": v["results"]} for k, v in study["references"].items()},
            "rows": [{k: v for k, v in r.items() if k != "items"} for r in study["rows"]]}
    write_bytes_atomic(out / "dose_study.json", json.dumps(slim, indent=1).encode())
    return write_dose_report(out, study, study["titles"])
