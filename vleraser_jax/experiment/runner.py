"""Running a configured experiment: vanilla (cached) -> each method -> evaluation -> diagnostics -> the report."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Sequence

from ..checkpoints import load_pretrained, load_pretrained_sharded
from ..data import mllmu
from ..eval.diagnostics import diagnostics_settings
from ..eval.evaluate import evaluate
from ..eval.report import load_diagnostics, load_results, write_report
from ..parallel import sharder_for
from ..processing import load_processor
from ..train.stages import run_stage
from ..train.workspace import data_root, model_runtime, tensorboard_on
from .artifacts import save_method_run
from .diagnostics import run_diagnostics
from .methods import eval_config, run_method, section


def load_vanilla(c, vanilla_dir):
    """The vanilla model for the config: read shard by shard onto the config's mesh when it has one."""
    sharding = sharder_for(c)
    if sharding is not None:
        return load_pretrained_sharded(vanilla_dir, sharding, **model_runtime(c))
    return load_pretrained(vanilla_dir, **model_runtime(c))


def report_dir_for(c) -> Path:
    return Path(c.work_dir) / "reports" / f"{c.name}-forget{c.data.forget_ratio}"


def run_experiment(c, methods: Sequence[str], *, diagnostics: dict | None = None, log=print) -> Path:
    """Vanilla (cached) -> each method -> evaluation -> diagnostics -> the shared report; returns its directory.

    diagnostics: settings over the config's `diagnostics` section (`eval.diagnostics.DIAGNOSTICS_DEFAULTS`
    when it has none), e.g. {"relearn": False}. Each method's wall time is always recorded (the cost table).
    """
    settings = diagnostics_settings(section(c, "diagnostics"), diagnostics)  # bad settings fail before any work
    tensorboard_on(c)  # so does TensorBoard logging without tensorboardX
    vanilla_dir = run_stage(c, "vanilla", log=log)
    model, params, config = load_vanilla(c, vanilla_dir)
    processor = load_processor(vanilla_dir)
    bench = mllmu.load_benchmark(data_root(c), c.data.forget_ratio)
    report_dir = report_dir_for(c)
    meta = {"model": c.name, "forget_ratio": c.data.forget_ratio, "vanilla": str(vanilla_dir)}
    ecfg = eval_config(c)
    if "Vanilla" not in load_results(report_dir):
        log("evaluating the vanilla model")
        result = evaluate(model, params, processor, bench, ecfg)
        write_report(report_dir, "Vanilla", result.results, meta)
    done = load_diagnostics(report_dir)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"  # "the same run" of the cost ratios
    timings = {}
    for method in methods:
        log(f"== {method}")
        t0 = time.perf_counter()
        run_dir = report_dir / "runs" / method
        run = run_method(c, method, model, params, processor, bench, log=log, run_dir=run_dir)
        wall = time.perf_counter() - t0
        save_method_run(run_dir, run, model.config, source_dir=vanilla_dir)
        result = evaluate(model, run.params, processor, bench, ecfg)
        timings[run.title] = {k: v for k, v in run.info.items() if k.endswith("_seconds")}
        # a baseline's total_seconds already sums its other parts: listing it would count them twice
        cost = {"run": run_id, "wall_seconds": wall,
                "parts": {k: v for k, v in timings[run.title].items() if k != "total_seconds"}}
        write_report(report_dir, run.title, result.results, {**meta, "timings_s": timings}, diagnostics={"cost": cost})
        run_diagnostics(c, method, run.title, settings, model, params, run.params, processor, bench, ecfg,
                        result.results, report_dir, done.get(run.title, {}), family=config.model_type, log=log)
    log(f"report: {report_dir / 'report.md'}")
    return report_dir
