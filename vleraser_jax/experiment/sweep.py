"""Choosing a method's settings on a validation split of pseudo-forget people, never the reported forget people."""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from ..data import mllmu
from ..data.splits import validation_benchmark
from ..eval.evaluate import evaluate
from ..processing import load_processor
from ..train.stages import run_stage
from ..train.workspace import data_root
from .methods import eval_config, run_method, with_method_settings
from .runner import load_vanilla

SWEEP_METRICS = ("cloze", "classification")


def mean_over_modes(results, set_name: str, metric: str) -> float:
    """A set's score for one metric, averaged over the Visual-QA and Textual-QA modes."""
    modes = results.get(set_name, {})
    values = [m[metric]["value"] for m in modes.values() if metric in m]
    return float(np.mean(values)) if values else float("nan")


def run_sweep(c, grid: dict[str, list], *, method: str = "vl_eraser", metric: str = "cloze",
              validation_people: int = 10, max_retain_people: int = 40, max_retain_drop: float = 0.10,
              log=print) -> tuple[dict, list[dict]]:
    """Grid search of one method's settings on `validation_benchmark` (never the reported forget people).

    The same protocol for every method (VL-Eraser and the baselines alike), so each gets an equal budget.

    Score = fraction of the way the forget score (`metric`, mean of both modes) moved from the vanilla
    model's to the *base* model's on the same people: the base never saw them, so its score is what
    "forgotten" looks like (for classification that is chance). Settings whose retain score drops more
    than `max_retain_drop` are not eligible. Returns (best setting, every row).
    """
    if metric not in SWEEP_METRICS:
        raise ValueError(f"sweep metric must be one of {SWEEP_METRICS}, got {metric!r}")
    vanilla_dir = run_stage(c, "vanilla", log=log)
    model, params, _ = load_vanilla(c, vanilla_dir)
    processor = load_processor(vanilla_dir)
    bench = validation_benchmark(mllmu.load_benchmark(data_root(c), c.data.forget_ratio), validation_people, c.seed)
    ecfg = dataclasses.replace(eval_config(c), sets=("forget", "retain"), tasks=(metric,), option_likelihood=False,
                               max_people=max_retain_people)
    vanilla = evaluate(model, params, processor, bench, ecfg).results
    v_forget, v_retain = mean_over_modes(vanilla, "forget", metric), mean_over_modes(vanilla, "retain", metric)
    base_dir = run_stage(c, "base", log=log)
    base_params = load_vanilla(c, base_dir)[1]
    floor = mean_over_modes(evaluate(model, base_params, processor, bench, ecfg).results, "forget", metric)
    del base_params
    log(f"validation {metric}: vanilla forget {v_forget:.3f}, retain {v_retain:.3f}; base (never saw them) "
        f"forget {floor:.3f}")
    rows = []
    keys = sorted(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        setting = dict(zip(keys, values))
        t0 = time.perf_counter()
        unlearned = run_method(with_method_settings(c, method, setting), method, model, params, processor, bench,
                               log=lambda *_: None).params
        seconds = time.perf_counter() - t0
        res = evaluate(model, unlearned, processor, bench, ecfg).results
        f, r = mean_over_modes(res, "forget", metric), mean_over_modes(res, "retain", metric)
        progress = (v_forget - f) / max(v_forget - floor, 1e-9)
        row = {**setting, "forget": f, "retain": r, "progress": progress,
               "eligible": v_retain - r <= max_retain_drop, "seconds": seconds}
        rows.append(row)
        log(" ".join(f"{k}={v}" for k, v in setting.items()) + f"  forget {f:.3f} retain {r:.3f} progress {progress:.2f}"
            + ("" if row["eligible"] else "  (retain drop too large)"))
    eligible = [r for r in rows if r["eligible"]] or rows
    best = max(eligible, key=lambda r: r["progress"])
    return {k: best[k] for k in keys}, rows
