"""One selection protocol for every method: a fixed budget of settings, each scored on validation pseudo-forget
people (retain people the oracle was retrained without, never the reported forget people).

Per setting: unlearn the validation people, then score forget (those people), retain (the other retain people)
and real on cloze and option-likelihood accuracy, both modes. Eligible: mean retain and mean real utility
within `tolerance` of Vanilla's on the same people. Chosen: the eligible setting whose forget scores are
closest to the Oracle's (mean absolute difference over metrics and modes: the oracle never saw these people,
so it is what "forgotten" looks like). When nothing is eligible the result says so, names no choice, and
keeps the forget–utility frontier (the settings no other setting beats on both distance and utility loss).

A setting travels to the reported run as the optimizer steps it ran here (`run_setting`): a baseline's epochs
over 10 validation people are 1.5× the steps over 15 forget people, and that extra dose is where a validated
setting fell off the utility cliff (README "How every method's settings were chosen").
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data import mllmu
from ..data.splits import validation_benchmark
from ..eval.evaluate import evaluate
from ..io import append_record, read_records, write_bytes_atomic
from ..processing import load_processor
from ..train.stages import run_stage
from ..train.workspace import data_root, oracle_enabled, prepare_data
from ..unlearn.baselines import run_plan
from .methods import METHODS, baseline_method_config, eval_config, method_config, run_method, with_method_settings
from .pipeline import load_vanilla
from .runner import committed_selection_dir, selection_dir

SELECTION_METRICS = ("cloze", "option_acc")
UTILITY_SETS = ("retain", "real")
DEFAULT_BUDGET = 12
DEFAULT_TOLERANCE = 0.05


def set_scores(results: dict, set_name: str) -> dict[str, float]:
    """{"<metric>/<mode>": value} of one set for the selection metrics."""
    out = {}
    for mode, metrics in sorted(results.get(set_name, {}).items()):
        for metric in SELECTION_METRICS:
            if metric in metrics:
                out[f"{metric}/{mode}"] = float(metrics[metric]["value"])
    return out


def mean_score(results: dict, set_name: str) -> float:
    values = list(set_scores(results, set_name).values())
    return float(np.mean(values)) if values else float("nan")


def distance_to(results: dict, target: dict, set_name: str = "forget") -> float:
    """Mean |score − target score| over the set's selection metrics and modes."""
    mine, theirs = set_scores(results, set_name), set_scores(target, set_name)
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        raise ValueError(f"no selection metric {SELECTION_METRICS} on the {set_name} set to compare")
    return float(np.mean([abs(mine[k] - theirs[k]) for k in shared]))


def utility_drops(results: dict, vanilla: dict) -> dict[str, float]:
    """{set: Vanilla's mean utility − this model's} for the utility sets both have."""
    return {s: mean_score(vanilla, s) - mean_score(results, s) for s in UTILITY_SETS
            if set_scores(vanilla, s) and set_scores(results, s)}


def frontier(rows: list[dict]) -> list[int]:
    """Indices of the rows no other row beats on both distance to the oracle and worst utility drop."""
    out = []
    for i, r in enumerate(rows):
        dominated = any(o["distance"] <= r["distance"] and o["worst_drop"] <= r["worst_drop"]
                        and (o["distance"] < r["distance"] or o["worst_drop"] < r["worst_drop"])
                        for j, o in enumerate(rows) if j != i)
        if not dominated:
            out.append(i)
    return out


def expand_grid(grid: dict[str, list], budget: int, seed: int = 0) -> list[dict]:
    """Exactly `budget` settings: the whole product when it has that many, a seeded sample of it when it has
    more; fewer is an error (every method gets the same number of tries)."""
    keys = sorted(grid)
    settings = [dict(zip(keys, values)) for values in itertools.product(*(list(grid[k]) for k in keys))]
    if len(settings) < budget:
        raise ValueError(f"the grid {grid} has {len(settings)} settings; the selection budget is {budget}")
    if len(settings) > budget:
        rng = np.random.default_rng([seed, 13])
        settings = [settings[i] for i in sorted(rng.choice(len(settings), size=budget, replace=False))]
    return settings


def choose(rows: list[dict]) -> dict:
    """{"chosen": index or None, "eligible": count, "frontier": indices, "reason": words}."""
    eligible = [i for i, r in enumerate(rows) if r["eligible"]]
    front = frontier(rows)
    if not eligible:
        return {"chosen": None, "eligible": 0, "frontier": front,
                "reason": "no setting kept retain and real within the tolerance of Vanilla: nothing is chosen"}
    best = min(eligible, key=lambda i: rows[i]["distance"])
    return {"chosen": best, "eligible": len(eligible), "frontier": front,
            "reason": f"closest to the Oracle of the {len(eligible)} eligible settings"}


@dataclasses.dataclass
class Validation:
    """The validation split, the vanilla model and the references' scores on it."""

    model: object
    params: object
    processor: object
    bench: mllmu.Benchmark
    ecfg: object
    vanilla: dict
    oracle: dict
    key: str


def prepare_validation(c, validation_people: int, max_people: int, log=print) -> Validation:
    """Vanilla and Oracle on the validation split (cached under the report's selection/ directory)."""
    if not oracle_enabled(c):
        raise ValueError("selection needs the oracle (distance to it is the score): set oracle.enabled=True")
    vanilla_dir, oracle_dir = run_stage(c, "vanilla", log=log), run_stage(c, "oracle", log=log)
    if validation_people != c.data.validation_people:
        raise ValueError(f"validation_people={validation_people}, but the oracle was retrained without "
                         f"data.validation_people={c.data.validation_people} people: they must be the same people")
    model, params, _ = load_vanilla(c, vanilla_dir)
    processor = load_processor(vanilla_dir)
    bench = validation_benchmark(mllmu.load_benchmark(data_root(c), c.data.forget_ratio), validation_people, c.seed)
    ecfg = dataclasses.replace(eval_config(c), tasks=("cloze",), option_likelihood=True, sets=("forget", "retain", "real"),
                               max_people=max_people or None, bootstrap_resamples=200)
    key = hashlib.sha256(json.dumps([str(vanilla_dir), str(oracle_dir), dataclasses.asdict(ecfg)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    cache = selection_dir(c) / "references.json"
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    if stored.get("key") != key:
        log("scoring Vanilla and the Oracle on the validation people")
        stored = {"key": key, "vanilla": evaluate(model, params, processor, bench, ecfg).results,
                  "oracle": evaluate(model, load_vanilla(c, oracle_dir)[1], processor, bench, ecfg).results}
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache, json.dumps(stored).encode())
    return Validation(model, params, processor, bench, ecfg, stored["vanilla"], stored["oracle"], key)


def optimizer_steps(c, method: str, setting: dict, bench: mllmu.Benchmark) -> int:
    """How many optimizer steps `method` at `setting` runs on `bench`'s forget (and retain) training rows."""
    cs = with_method_settings(c, method, setting)
    if method in METHODS:  # VL-Eraser counts steps already
        return int(method_config(cs, method)[2].steps)
    _, cfg, run = baseline_method_config(cs, method)
    return len(run_plan(cfg, run, len(bench.forget_train), len(bench.retain_train)))


STEP_TRANSFER_ORDERS = ("forget", "paired")  # orders whose every step reads one forget batch


def run_setting(c, method: str, setting: dict, bench: mllmu.Benchmark) -> dict:
    """`setting` as the reported run applies it: a baseline whose every step reads a forget batch (GA, GD, KL,
    NPO) at the optimizer steps it ran on the validation people (`bench`), its epochs dropped. Unchanged: VL-Eraser
    (it counts steps) and MMUnlearner, whose interleaved plan is laid out from both sets' sizes, so a step count
    cut from a longer plan drops its closing retain steps (measured: real visual cloze -22.5 points vs -10.0)."""
    if method in METHODS:
        return dict(setting)
    if baseline_method_config(with_method_settings(c, method, setting), method)[1].order not in STEP_TRANSFER_ORDERS:
        return dict(setting)
    return {**setting, "epochs": None, "steps": optimizer_steps(c, method, setting, bench)}


def with_run_settings(c, method: str, rows: list[dict], bench: mllmu.Benchmark) -> list[dict]:
    """The rows, each with its `run_setting` on the validation split `bench`."""
    return [{**row, "run_setting": run_setting(c, method, row["setting"], bench)} for row in rows]


def score_setting(val: Validation, results: dict, tolerance: float) -> dict:
    drops = utility_drops(results, val.vanilla)
    worst = max(drops.values()) if drops else float("nan")
    return {"distance": distance_to(results, val.oracle), "forget": set_scores(results, "forget"),
            "drops": drops, "worst_drop": worst, "eligible": bool(drops) and worst <= tolerance}


def run_sweep(c, grid: dict[str, list], *, method: str = "vl_eraser", budget: int = DEFAULT_BUDGET,
              tolerance: float = DEFAULT_TOLERANCE, validation_people: int | None = None, max_people: int = 40,
              log=print) -> dict:
    """Select `method`'s setting from `budget` settings of `grid` (see the module docstring); the result (every
    row, the choice or its absence, the frontier) is also written to <report>/selection/<method>.json."""
    validation_people = c.data.validation_people if validation_people is None else validation_people
    val = prepare_validation(c, validation_people, max_people, log)
    settings = expand_grid(grid, budget, c.seed)
    log(f"{method}: {len(settings)} settings on {len(val.bench.forget)} validation people "
        f"(eligible: retain and real within {tolerance:.0%} of Vanilla; score: distance to the Oracle)")
    rows, done = [], finished_rows(c, method)
    ids = [setting_id(c, method, s, val.key) for s in settings]
    if done.keys() & set(ids):
        log(f"{method}: reusing the settings a previous run of this selection finished")
    for setting, row_id in tqdm(list(zip(settings, ids)), desc=f"selecting {method}", unit="setting", leave=False):
        if row_id in done:
            rows.append(done[row_id])
            continue
        t0 = time.perf_counter()
        unlearned = run_method(with_method_settings(c, method, setting), method, val.model, val.params,
                               val.processor, val.bench, log=lambda *_: None).params
        results = evaluate(val.model, unlearned, val.processor, val.bench, val.ecfg).results
        row = {"setting": setting, **score_setting(val, results, tolerance), "seconds": time.perf_counter() - t0}
        rows.append(row)
        record_row(c, method, row_id, row)
        log(f"  {format_setting(setting)}: distance {row['distance']:.3f}, utility drop "
            + ", ".join(f"{k} {v:+.3f}" for k, v in row["drops"].items()) + ("" if row["eligible"] else "  (not eligible)"))
    out = {"method": method, "budget": budget, "tolerance": tolerance, "validation_people": len(val.bench.forget),
           "retain_people": min(len(val.bench.retain), max_people or len(val.bench.retain)), "grid": grid,
           "references": {"vanilla": {"forget": set_scores(val.vanilla, "forget"),
                                      **{s: mean_score(val.vanilla, s) for s in UTILITY_SETS}},
                          "oracle": {"forget": set_scores(val.oracle, "forget"),
                                     "distance": distance_to(val.oracle, val.oracle),
                                     "vanilla_distance": distance_to(val.vanilla, val.oracle)}},
           "rows": with_run_settings(c, method, rows, val.bench), **choose(rows), "key": val.key}
    write_selection(c, method, out, log)
    return out


def write_selection(c, method: str, out: dict, log=print) -> None:
    """<report>/selection/<method>.json, then one line: the choice and the setting the reported run uses."""
    path = selection_dir(c) / f"{method}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(out, indent=1).encode())
    chosen = out["rows"][out["chosen"]] if out["chosen"] is not None else None
    log(f"{method}: {out['reason']}" + (f": {format_setting(chosen['setting'])}; the reported run uses "
                                         f"{format_setting(chosen['run_setting'])}" if chosen else ""))


def restate_selection(c, method: str, log=print) -> dict:
    """A stored selection (this work dir's, else the committed one) rewritten with each row's `run_setting`,
    without running any setting: for selections made before run settings were recorded. Needs only the data."""
    path = selection_dir(c) / f"{method}.json"
    committed = committed_selection_dir(c)
    if not path.exists() and committed is not None:
        path = committed / f"{method}.json"
    if not path.exists():
        raise FileNotFoundError(f"{method}: no stored selection at {selection_dir(c)} or in results/ to restate")
    stored = json.loads(path.read_text())
    prepare_data(c, log)
    bench = validation_benchmark(mllmu.load_benchmark(data_root(c), c.data.forget_ratio), stored["validation_people"],
                                 c.seed)
    out = {**stored, "rows": with_run_settings(c, method, stored["rows"], bench)}
    log(f"{method}: restating {path} ({len(out['rows'])} settings, choice unchanged)")
    write_selection(c, method, out, log)
    return out


def setting_id(c, method: str, setting: dict, validation_key: str) -> str:
    """Identity of one trial: the references' key and the whole resolved config it runs under (minus paths)."""
    resolved = with_method_settings(c, method, setting).to_dict()
    resolved.pop("work_dir", None)
    blob = json.dumps([validation_key, method, resolved], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trials_path(c, method: str) -> Path:
    return selection_dir(c) / f"{method}.trials.jsonl"


def finished_rows(c, method: str) -> dict[str, dict]:
    """{trial id: row} of the trials a previous (possibly killed) run finished; a cut-off last line is ignored."""
    return read_records(trials_path(c, method))


def record_row(c, method: str, row_id: str, row: dict) -> None:
    append_record(trials_path(c, method), row_id, row)


def format_setting(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(setting.items()))

