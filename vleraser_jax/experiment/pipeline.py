"""The pieces of an experiment: its stages trained (or reused), the opened experiment (vanilla model, benchmark,
evaluation settings), its references evaluated or read back from the report, and one method run into a report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from ..checkpoints import load_pretrained, load_pretrained_sharded
from ..data import mllmu
from ..data.splits import load_holdout
from ..eval.evaluate import evaluate
from ..eval.membership import membership_inference
from ..eval.report import ReportError, items_file, load_items, load_results, load_unlearning, write_report
from ..eval.unlearning import minimum_detectable, unlearning_summary
from ..parallel import sharder_for
from ..processing import load_processor
from ..train.stages import run_stage
from ..train.workspace import data_root, model_runtime, oracle_enabled, prepare_data
from .artifacts import save_method_run
from .diagnostics import run_diagnostics
from .methods import eval_config, run_method
from .overview import Timings


REFERENCES = ("Vanilla", "Oracle")


def load_vanilla(c, vanilla_dir):
    """A stage's model for the config: read shard by shard onto the config's mesh when it has one."""
    sharding = sharder_for(c)
    if sharding is not None:
        return load_pretrained_sharded(vanilla_dir, sharding, **model_runtime(c))
    return load_pretrained(vanilla_dir, **model_runtime(c))


def report_dir_for(c) -> Path:
    return Path(c.work_dir) / "reports" / f"{c.name}-forget{c.data.forget_ratio}"


@dataclasses.dataclass
class Experiment:
    """What every method of one run is evaluated with and against."""

    c: object
    model: object
    vanilla: object  # the vanilla parameters
    processor: object
    bench: mllmu.Benchmark
    holdout: object  # splits.Holdout or None
    ecfg: object
    report_dir: Path
    meta: dict
    references: dict = dataclasses.field(default_factory=dict)  # name -> (results, items)
    reference_membership: dict = dataclasses.field(default_factory=dict)  # name -> membership entry
    timings: Timings = dataclasses.field(default_factory=Timings)

    def score(self, params):
        """(results, per-item scores, membership inference or None) of one model."""
        result = evaluate(self.model, params, self.processor, self.bench, self.ecfg)
        membership = None
        if self.holdout is not None:
            membership = membership_inference(self.model, params, self.processor, self.bench.forget_train,
                                              self.holdout.rows, batch_size=self.ecfg.batch_size,
                                              max_length=self.ecfg.likelihood_max_length, seed=self.ecfg.seed)
        return result.results, result.items, membership

    def add_reference(self, name: str, results, items, membership) -> None:
        self.references[name] = (results, items)
        if membership:
            self.reference_membership[name] = membership

    def summary(self, results, items, membership) -> dict:
        return unlearning_summary(results, items, self.references, membership=membership,
                                  oracle_membership=self.reference_membership.get("Oracle"),
                                  resamples=self.ecfg.bootstrap_resamples, seed=self.ecfg.seed)


def _eval_key(ecfg, *dirs) -> str:
    blob = json.dumps({"eval": dataclasses.asdict(ecfg), "models": [str(d) for d in dirs]}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_stages(c, log=print, timings: Timings | None = None) -> tuple[Path, Path | None]:
    """The data, then every stage of the config trained (or reused): (vanilla dir, oracle dir or None)."""
    timings = timings or Timings()
    with timings.part("data and tokenizer"):
        prepare_data(c, log)
    for stage in ("base", "oracle") if oracle_enabled(c) else ("base",):
        with timings.part(f"{stage} stage"):
            run_stage(c, stage, log=log)
    with timings.part("vanilla stage"):
        vanilla_dir = run_stage(c, "vanilla", log=log)
    return vanilla_dir, (run_stage(c, "oracle", log=log) if oracle_enabled(c) else None)


def open_experiment(c, vanilla_dir, oracle_dir, log=print, timings: Timings | None = None) -> Experiment:
    """The trained stages' experiment without its references: the vanilla model, the benchmark, the evaluation
    settings and the report's meta."""
    model, params, _ = load_vanilla(c, vanilla_dir)
    processor = load_processor(vanilla_dir)
    root = data_root(c)
    bench = mllmu.load_benchmark(root, c.data.forget_ratio)
    holdout = load_holdout(root)
    if holdout is None:
        log(f"{root} has no holdout people ({'Holdout_Set'}): membership inference is skipped (MLLMU-Bench has none)")
    ecfg = eval_config(c)
    key = _eval_key(ecfg, vanilla_dir, oracle_dir)
    meta = {"model": c.name, "forget_ratio": c.data.forget_ratio, "forget_people": len(bench.forget),
            "vanilla": str(vanilla_dir), "oracle": str(oracle_dir) if oracle_dir else "none (oracle.enabled=False)",
            "protocol": f"letter rule {ecfg.letter_rule}, {ecfg.few_shot_people} few-shot people, at most "
                        f"{ecfg.max_people or 'all'} people per set (MLLMU-Bench eval.py: first_char, 2 for LLaVA, all)",
            "eval_key": key}
    return Experiment(c, model, params, processor, bench, holdout, ecfg, report_dir_for(c), meta,
                      timings=timings or Timings())


def prepare_experiment(c, log=print, timings: Timings | None = None) -> Experiment:
    """Train (or reuse) the stages, load the vanilla model and the benchmark, and evaluate the references
    (cached in the report while the evaluation settings and the models stay the same)."""
    timings = timings or Timings()
    vanilla_dir, oracle_dir = run_stages(c, log, timings)
    exp = open_experiment(c, vanilla_dir, oracle_dir, log, timings)
    with timings.part("evaluate Vanilla and Oracle"):
        _reference_scores(exp, {"Vanilla": lambda: exp.vanilla, "Oracle": (lambda: load_vanilla(c, oracle_dir)[1])
                                if oracle_dir else None}, log)
    if c.eval.get("base_row", False):  # what never having learned any fictitious person looks like
        with timings.part("evaluate Base"):
            base_dir = run_stage(c, "base", log=log)
            _score_once(exp, "Base", base_dir, lambda: load_vanilla(c, base_dir)[1], log)
    return exp


def attach_references(exp: Experiment) -> None:
    """Read the references' results, per-item scores and membership from the report, as `_reference_scores`
    left them (a worker process compares its method with them without evaluating them again)."""
    stored, unlearning = load_results(exp.report_dir), load_unlearning(exp.report_dir)
    for name in REFERENCES:
        if name not in stored:
            continue
        items = load_items(exp.report_dir, name)
        if items is None:
            raise ReportError(f"{exp.report_dir}: {name} has results but no {items_file(name)}")
        exp.add_reference(name, stored[name], items, unlearning.get(name, {}).get("membership"))


def _score_once(exp: Experiment, name: str, model_dir, load, log) -> None:
    """Evaluate a model that is not a reference (the base) unless the report holds its evaluation under the same
    key (evaluation settings and this model's directory), kept in its own summary: the report-level key follows
    the references, which are rewritten before it."""
    key = _eval_key(exp.ecfg, model_dir)
    stored = load_unlearning(exp.report_dir).get(name, {})
    if stored.get("eval_key") == key and name in load_results(exp.report_dir) \
            and load_items(exp.report_dir, name) is not None:
        log(f"{name}: evaluation reused from {exp.report_dir}")
        return
    log(f"evaluating the {name.lower()} model")
    results, items, membership = exp.score(load())
    write_report(exp.report_dir, name, results, exp.meta, items=items,
                 unlearning={name: {**exp.summary(results, items, membership), "eval_key": key}})


def _reference_scores(exp: Experiment, loaders: dict, log) -> None:
    """Evaluate (or reuse) Vanilla and the Oracle, then write both references' summaries."""
    stored = load_results(exp.report_dir)
    fresh = _stored_meta(exp.report_dir).get("eval_key") == exp.meta["eval_key"]
    unlearning = load_unlearning(exp.report_dir)
    for name, load in loaders.items():
        if load is None:
            continue
        items = load_items(exp.report_dir, name) if fresh and name in stored else None
        if items is None:
            log(f"evaluating the {name.lower()} model")
            results, items, membership = exp.score(load())
            write_report(exp.report_dir, name, results, exp.meta, items=items)
        else:
            log(f"{name}: evaluation reused from {exp.report_dir}")
            results, membership = stored[name], unlearning.get(name, {}).get("membership")
        exp.add_reference(name, results, items, membership)
    summaries = {}
    for name, (results, items) in exp.references.items():
        summaries[name] = exp.summary(results, items, exp.reference_membership.get(name))
    summaries["Vanilla"]["mdd"] = minimum_detectable(exp.references["Vanilla"][1])
    write_report(exp.report_dir, "Vanilla", None, exp.meta, unlearning=summaries)


def _stored_meta(report_dir: Path) -> dict:
    path = report_dir / "results.json"
    return json.loads(path.read_text()).get("meta", {}) if path.exists() else {}


def run_one_method(exp: Experiment, method: str, settings: dict, done: dict, run_id: str, timings: dict,
                   report_dir: Path, log=print, cost_extra: dict | None = None) -> str:
    """Unlearn with one method, save its run, evaluate it, compare it with the references and run its diagnostics,
    writing into the report at `report_dir` (the experiment's own, or a worker's scratch report). done: this
    method's stored diagnostics (skipped when their keys match). timings: title -> parts of every method so far
    (the report's meta), updated. Returns the method's title."""
    c, part = exp.c, exp.timings.part
    t0 = time.perf_counter()
    run_dir = exp.report_dir / "runs" / method
    with part(f"{method}: unlearn"):
        run = run_method(c, method, exp.model, exp.vanilla, exp.processor, exp.bench, log=log, run_dir=run_dir)
    wall = time.perf_counter() - t0
    timings[run.title] = {k: v for k, v in run.info.items() if k.endswith("_seconds")}
    # a baseline's total_seconds already sums its other parts: listing it would count them twice
    cost = {"run": run_id, "wall_seconds": wall, **(cost_extra or {}),
            "parts": {k: v for k, v in timings[run.title].items() if k != "total_seconds"}}
    with part(f"{method}: save, evaluate, compare"):
        save_method_run(run_dir, run, exp.model.config, source_dir=exp.meta["vanilla"])
        results, items, membership = exp.score(run.params)
        write_report(report_dir, run.title, results, {**exp.meta, "timings_s": timings},
                     diagnostics={"cost": cost}, items=items,
                     unlearning={run.title: exp.summary(results, items, membership)})
    with part(f"{method}: diagnostics"):
        run_diagnostics(c, method, run.title, settings, exp.model, exp.vanilla, run.params, exp.processor,
                        exp.bench, exp.ecfg, results, report_dir, done, family=exp.model.config.model_type, log=log)
    return run.title
