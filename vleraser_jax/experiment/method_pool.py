"""An experiment's methods on a few worker processes at once (`vleraser demo --workers 2`).

Each worker opens the experiment once (the vanilla model, the benchmark, the references as the report holds
them), then runs whole methods, each into a scratch report `<report>/.concurrent/<method>/` with its output in
`<report>/runs/<method>/output.log`. The main process merges every finished method into the report in the order
the methods were asked for, so the report is the one a single process writes, timings aside.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import ml_collections

from ..eval.report import load_diagnostics, load_items, load_results, load_unlearning, write_report
from ..train.workspace import oracle_enabled, use_compilation_cache
from .concurrent import TaskFailed, run_in_workers
from .methods import method_title
from .overview import Timings
from .pipeline import Experiment, attach_references, open_experiment, run_one_method

_WORKER: dict = {}  # the worker process's experiment and what every task shares


def default_workers(c) -> int:
    """2 for a tiny model on a CPU host with at least 2 cores (what the measurement above holds for), else 1: an
    accelerator or a mesh is one device set two processes would contend for, and a pretrained checkpoint would
    be held in memory once per process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if jax.default_backend() != "cpu" or cores < 2 or c.get("mesh") or c.model.get("checkpoint"):
        return 1
    return 2


def scratch_dir(report_dir: Path, method: str) -> Path:
    return Path(report_dir) / ".concurrent" / method


def output_log(report_dir: Path, method: str) -> Path:
    return Path(report_dir) / "runs" / method / "output.log"


def run_methods_in_workers(exp: Experiment, methods, settings: dict, done: dict, run_id: str, workers: int,
                           log=print) -> None:
    """Run `methods` on `workers` processes and merge each into `exp.report_dir` in order (see the module)."""
    log(f"running {len(methods)} methods on {workers} worker processes at once; each method's output goes to "
        f"{output_log(exp.report_dir, '<method>')}")
    payload = {"config": exp.c.to_json(), "meta": exp.meta, "settings": settings, "done": done, "run_id": run_id,
               "workers": workers}
    timings: dict = {}
    counter = {"merged": 0, "t0": time.perf_counter()}
    wall = f"{len(methods)} methods on {workers} worker processes"

    def merge(method: str, outcome: dict) -> None:
        title = outcome["title"]
        timings[title] = outcome["timing"]
        _merge_scratch(exp, title, Path(outcome["scratch"]), timings)
        for name, seconds in outcome["parts"].items():
            exp.timings.add_inner(wall, name, seconds)
        counter["merged"] += 1
        log(f"== {method} finished ({counter['merged']}/{len(methods)}, {outcome['seconds']:.0f} s in its worker, "
            f"{time.perf_counter() - counter['t0']:.0f} s since the methods started)")

    with exp.timings.part(wall):
        try:
            run_in_workers(list(methods), workers, _method_task, merge, initializer=_open_worker,
                           initargs=(payload,))
        except TaskFailed as e:  # the traceback of a method is in its own log
            where = f"; its output: {output_log(exp.report_dir, e.task)}" if e.task in methods else ""
            raise TaskFailed(f"{e}{where} (the methods before it are in the report)", e.task) from e.__cause__
    shutil.rmtree(Path(exp.report_dir) / ".concurrent", ignore_errors=True)


def _merge_scratch(exp: Experiment, title: str, scratch: Path, timings: dict) -> None:
    """One write into the experiment's report with everything a worker wrote for `title` into its scratch report."""
    write_report(exp.report_dir, title, load_results(scratch)[title], {**exp.meta, "timings_s": timings},
                 diagnostics=load_diagnostics(scratch).get(title, {}),
                 unlearning={title: load_unlearning(scratch)[title]}, items=load_items(scratch, title))
    shutil.rmtree(scratch)


def _open_worker(payload: dict) -> None:
    c = ml_collections.ConfigDict(json.loads(payload["config"]))
    use_compilation_cache(c)  # the main process's cache: programs one method compiled serve the others
    meta = payload["meta"]  # the main process's, eval key included: the stage dirs come from it
    oracle = Path(meta["oracle"]) if oracle_enabled(c) else None
    exp = open_experiment(c, Path(meta["vanilla"]), oracle, log=lambda *_: None)
    exp.meta = meta
    attach_references(exp)
    _WORKER.update(payload, exp=exp)


def _method_task(method: str) -> dict:
    exp: Experiment = _WORKER["exp"]
    exp.timings = Timings()
    scratch = scratch_dir(exp.report_dir, method)
    shutil.rmtree(scratch, ignore_errors=True)  # an interrupted earlier run's
    t0 = time.perf_counter()
    with _output_to(output_log(exp.report_dir, method)):
        title = method_title(exp.c, method)
        print(f"== {method} (worker process {os.getpid()})", flush=True)
        timings: dict = {}
        run_one_method(exp, method, _WORKER["settings"], _WORKER["done"].get(title, {}), _WORKER["run_id"],
                       timings, scratch, cost_extra={"concurrent_workers": _WORKER["workers"]})
    return {"title": title, "timing": timings[title], "parts": dict(exp.timings.parts), "scratch": str(scratch),
            "seconds": time.perf_counter() - t0}


@contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (Python's and the C libraries') to `path` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
