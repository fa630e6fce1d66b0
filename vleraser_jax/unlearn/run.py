"""Run an unlearning method end to end on a trained model: data -> method -> unlearned model -> evaluation.

`unlearn_vl_eraser` builds the vacuum projectors from the retain set's images, trains the LoRA on the
forget set (stage 1), deletes it (stage 2), writes the artifacts (LoRA + projectors with orbax, the
unlearned model with `save_pretrained`) and returns the unlearned parameters with timings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from ..data import mllmu
from ..checkpoints import save_pretrained
from ..parallel import sharder_for
from . import lora as lora_lib
from . import trainer as tr
from . import vacuum
from . import vl_eraser as vle


@dataclasses.dataclass(frozen=True)
class StageOneConfig:
    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    max_length: int = 128
    seed: int = 0


def retain_image_batches(processor, rows: Sequence[mllmu.TrainingRow], batch_size: int = 32) -> list[dict]:
    """One image-grounded prompt per retain person (its first image row): the projector's statistics."""
    first: dict[str, mllmu.TrainingRow] = {}
    for row in rows:
        if row.image is not None and row.person_id not in first:
            first[row.person_id] = row
    chosen = [first[k] for k in sorted(first)]
    if not chosen:
        raise ValueError("the retain set has no image-grounded rows to build the vacuum projector from")
    batches = []
    for start in range(0, len(chosen), batch_size):
        part = chosen[start : start + batch_size]
        texts = [processor.build_prompt(r.question, with_image=True) for r in part]
        images = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in part]
        batches.append(processor(texts, images=images, padding_side="right"))
    return batches


def save_artifacts(path: Path, lora, projectors, meta: dict) -> None:
    """LoRA and projectors as an orbax checkpoint (restorable with `load_artifacts`), meta as JSON.

    Written into a temporary sibling directory and swapped into place: a failure (a full disk included)
    leaves any previous artifacts at `path` intact and no partial directory.
    """
    import orbax.checkpoint as ocp

    from ..checkpoints import CheckpointError
    from ..io import atomic_directory

    path = Path(path).absolute()
    tree = {"lora": lora, "vacuum": projectors if projectors is not None else {}}
    try:
        with atomic_directory(path) as tmp:
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(tmp / "state", tree)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    except (OSError, ValueError) as e:  # orbax reports write failures as either
        previous = "the previous artifacts are unchanged" if path.exists() else "nothing was written"
        raise CheckpointError(f"{path}: writing the artifacts failed ({e}); {previous}") from e


def load_artifacts(path: Path) -> tuple[dict, dict | None, dict]:
    """(lora, projectors or None, meta) as `save_artifacts` wrote them; CheckpointError names what is wrong."""
    import orbax.checkpoint as ocp

    from ..checkpoints import CheckpointError

    path = Path(path).absolute()
    for required in (path / "state", path / "meta.json"):
        if not required.exists():
            raise CheckpointError(f"{path}: not an artifacts directory written by save_artifacts (no {required.name})")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: not valid JSON ({e})") from None
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(path / "state")
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"{path / 'state'}: cannot restore the LoRA/projector checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(tree, dict) or "lora" not in tree or "vacuum" not in tree:
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"{path / 'state'}: expected 'lora' and 'vacuum' trees, got {found}")
    return tree["lora"], (tree["vacuum"] or None), meta


def unlearn_vl_eraser(
    model,
    params,
    processor,
    bench: mllmu.Benchmark,
    cfg: vle.VLEraserConfig,
    stage: StageOneConfig,
    out_dir: Path | None = None,
    *,
    forget_rows: Sequence[mllmu.TrainingRow] | None = None,
    source_dir: Path | None = None,
    sharding=None,
    log=print,
) -> tuple[Any, dict]:
    """VL-Eraser on `bench`'s forget set; returns (unlearned params, info with timings and reports).

    sharding: a `parallel.Sharder`: retain statistics, stage 1 and the deletion run sharded over its mesh.

    forget_rows: the rows stage 1 trains on (default: the benchmark's forget training rows).
    source_dir: the model's checkpoint dir, whose tokenizer/processor files the export copies.
    """
    from ..finetune import BatchSchedule, qa_example, tokenize

    info: dict[str, Any] = {"config": dataclasses.asdict(cfg), "stage1": dataclasses.asdict(stage)}
    projectors = None
    if cfg.vacuum:
        t0 = time.perf_counter()
        batches = retain_image_batches(processor, bench.retain_train)
        moments, n = vacuum.collect_moments(model, params, batches, cfg.pooling, sharding=sharding)
        projectors, report = vacuum.build_projectors(moments, cfg.threshold, cfg.threshold_mode, cfg.retained_rank)
        if cfg.layers is not None:
            keep = {f"layers_{i}" for i in cfg.layers}
            projectors = {"llm": {k: v for k, v in projectors.get("llm", {}).items() if k in keep}}
        info["projector_seconds"] = time.perf_counter() - t0
        info["projector_vectors"] = n
        info["projector_report"] = [dataclasses.asdict(r) for r in report]
        images = sum(len(b["input_ids"]) for b in batches)
        what = f"{images} retain images (one mean key each)" if cfg.pooling == "mean" else \
            f"{n} image-token keys of {images} retain images"
        log(f"vacuum projector from {what} in {info['projector_seconds']:.1f} s\n" + vacuum.format_report(report))
        if all(r.stored == "identity" for r in report):
            log(f"warning: no retain direction passes the {cfg.threshold_mode} threshold {cfg.threshold}: the "
                "projector is the identity (as with vacuum=False); lower the threshold or use threshold_mode='rank'")
    rows = list(forget_rows if forget_rows is not None else bench.forget_train)
    if not rows:
        raise ValueError("the forget set has no training rows")
    data = tokenize(processor, [qa_example(processor, r) for r in rows], stage.max_length)
    schedule = BatchSchedule([(data, 1.0)], stage.batch_size, stage.steps, stage.seed)
    lora = lora_lib.init(params, cfg.rank, cfg.alpha, jax.random.PRNGKey(stage.seed),
                         layers=cfg.layers, b_std=cfg.lora_b_std)
    trainable, scales = lora_lib.split_trainable(lora)
    frozen = {"params": params, "scales": scales, "vacuum": projectors}
    train_cfg = tr.TrainConfig(total_steps=stage.steps, learning_rate=stage.learning_rate, warmup_steps=stage.warmup_steps,
                               seed=stage.seed, log_every=max(stage.steps // 20, 1), description="VL-Eraser stage 1")
    result = tr.train(vle.stage1_loss_fn(model, cfg), trainable, frozen, schedule, train_cfg, sharding=sharding)
    info["stage1_seconds"] = result.seconds
    info["stage1_history"] = result.history
    lora = tr.merge(result.trainable, scales)
    t0 = time.perf_counter()
    unlearned = vle.delete(params, lora, projectors, cfg.delete_alpha, sharding=sharding)
    jax.block_until_ready(unlearned)
    info["delete_seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_artifacts(out_dir / "artifacts", lora, projectors, {k: v for k, v in info.items() if k != "stage1_history"})
        save_pretrained(unlearned, model.config, out_dir / "model", copy_files_from=source_dir)
    log(f"stage 1: {stage.steps} steps in {result.seconds:.1f} s (distill {result.history[-1]['distill']:.3f}, "
        f"ce {result.history[-1]['ce']:.3f}); deletion in {info['delete_seconds'] * 1e3:.1f} ms")
    return unlearned, info


# ------------------------------------------------------------------ experiments from a config


def validation_benchmark(bench: mllmu.Benchmark, num_people: int, seed: int = 0) -> mllmu.Benchmark:
    """A pseudo-forget split for choosing hyperparameters without touching the reported forget people.

    `num_people` retain people (seeded) play the forget set (their Test_Set images as its test set);
    the other retain people stay the retain set; real is unchanged. The reported forget people are in
    neither.
    """
    rng = np.random.default_rng([seed, 7])
    retain = list(bench.retain)
    if not 0 < num_people < len(retain):
        raise ValueError(f"validation needs 0 < num_people < {len(retain)} retain people, got {num_people}")
    chosen = {retain[i].person_id for i in rng.choice(len(retain), size=num_people, replace=False)}
    val = tuple(p for p in retain if p.person_id in chosen)
    by_id = {p.person_id: p for p in val}
    test = mllmu.load_profiles(bench.root, mllmu.TEST_SET, ids=sorted(chosen), fallback=by_id, verify_images=False)
    return dataclasses.replace(
        bench,
        forget=val,
        test=tuple(sorted(test, key=lambda p: p.person_id)),
        retain=tuple(p for p in retain if p.person_id not in chosen),
        forget_train=tuple(r for r in bench.retain_train if r.person_id in chosen),
        retain_train=tuple(r for r in bench.retain_train if r.person_id not in chosen),
    )

METHODS = {
    # name in the report, VLEraserConfig changes relative to the config's vl_eraser section
    "vl_eraser": ("VL-Eraser", {}),
    "vl_eraser_no_vacuum": ("VL-Eraser w/o vacuum (P = I)", {"vacuum": False}),
    "vl_eraser_no_distill": ("VL-Eraser w/o distill (λ = 0)", {"lambda_": 0.0}),
    "vl_eraser_no_ce": ("VL-Eraser w/o CE (λ = 1)", {"lambda_": 1.0}),
}


def all_methods() -> list[str]:
    from .baselines import BASELINES

    return sorted(METHODS) + sorted(BASELINES)


def _section(c, name: str) -> dict:
    section = c.get(name) if hasattr(c, "get") else None
    return dict(section) if section is not None else {}


def run_method(c, method: str, model, params, processor, bench, out_dir=None, *, source_dir=None, log=print):
    """One method by name (VL-Eraser variant or baseline) with the config's settings -> (title, params, info).

    Baseline settings: `baseline_method_config`.
    """
    if method in METHODS:
        title, cfg, stage = method_config(c, method)
        unlearned, info = unlearn_vl_eraser(model, params, processor, bench, cfg, stage, out_dir,
                                            source_dir=source_dir, sharding=sharder_for(c), log=log)
        return title, unlearned, info
    from .baselines import unlearn_baseline

    title, settings, stage = baseline_method_config(c, method)
    unlearned, info = unlearn_baseline(
        model, params, processor, bench, method, settings, stage, out_dir, source_dir=source_dir,
        sharding=sharder_for(c), log=log)
    return title, unlearned, info


def baseline_method_config(c, method: str):
    """(title, BaselineConfig, StageOneConfig) of a baseline: `c.baselines.<method>` holds its BaselineConfig
    fields and StageOneConfig fields that override the shared `c.baselines.stage` (absent: the 7B
    reference values)."""
    from .baselines import BASELINES, baseline_config, reference_stage

    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; known: {all_methods()}")
    section = _section(c, "baselines")
    own = dict(section.get(method, {}))
    stage_fields = {f.name for f in dataclasses.fields(StageOneConfig)}
    title, settings = baseline_config(method, {k: v for k, v in own.items() if k not in stage_fields})
    stage = reference_stage(method, **{**dict(section.get("stage", {})),
                                       **{k: v for k, v in own.items() if k in stage_fields}, "seed": c.seed})
    return title, settings, stage


def method_config(c, method: str) -> tuple[str, vle.VLEraserConfig, StageOneConfig]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    title, changes = METHODS[method]
    section = c.get("vl_eraser") if hasattr(c, "get") else None
    fields = {f.name for f in dataclasses.fields(vle.VLEraserConfig)}
    stage_fields = {f.name for f in dataclasses.fields(StageOneConfig)}
    values = dict(section) if section is not None else {}
    cfg = vle.VLEraserConfig(**{k: (tuple(v) if k == "layers" and v is not None else v)
                                for k, v in values.items() if k in fields})
    stage = StageOneConfig(**{k: v for k, v in values.items() if k in stage_fields and k != "seed"}, seed=c.seed)
    return title, dataclasses.replace(cfg, **changes), stage


def eval_config(c):
    from ..eval.evaluate import EvalConfig

    e = c.eval
    optional = {k: e[k] for k in ("max_new_tokens",) if k in e}  # absent: the protocol's value
    return EvalConfig(batch_size=e.batch_size, max_people=e.max_people or None, few_shot_people=e.few_shot_people,
                      seed=c.seed, **optional)


def load_vanilla(c, vanilla_dir):
    """The vanilla model for the config: read shard by shard onto the config's mesh when it has one."""
    from ..finetune import model_runtime
    from ..checkpoints import load_pretrained
    from ..checkpoints import load_pretrained_sharded

    sharding = sharder_for(c)
    if sharding is not None:
        return load_pretrained_sharded(vanilla_dir, sharding, **model_runtime(c))
    return load_pretrained(vanilla_dir, **model_runtime(c))


def run_experiment(c, methods: Sequence[str], *, diagnostics: dict | None = None, log=print) -> Path:
    """Vanilla (cached) -> each method -> evaluation -> diagnostics -> the shared report; returns its directory.

    diagnostics: settings over the config's `diagnostics` section (`eval.diagnostics.DIAGNOSTICS_DEFAULTS`
    when it has none), e.g. {"relearn": False}. Each method's wall time is always recorded (the cost table).
    """
    from ..eval.diagnostics import diagnostics_settings
    from ..eval.evaluate import evaluate
    from ..eval.report import load_diagnostics, load_results, write_report
    from ..finetune import data_root, run_stage
    from ..processing import load_processor

    settings = diagnostics_settings(_section(c, "diagnostics"), diagnostics)  # bad settings fail before any work
    vanilla_dir = run_stage(c, "vanilla", log=log)
    model, params, config = load_vanilla(c, vanilla_dir)
    processor = load_processor(vanilla_dir)
    bench = mllmu.load_benchmark(data_root(c), c.data.forget_ratio)
    report_dir = Path(c.work_dir) / "reports" / f"{c.name}-forget{c.data.forget_ratio}"
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
        out = report_dir / "runs" / method
        t0 = time.perf_counter()
        title, unlearned, info = run_method(c, method, model, params, processor, bench, out,
                                            source_dir=vanilla_dir, log=log)
        wall = time.perf_counter() - t0
        result = evaluate(model, unlearned, processor, bench, ecfg)
        timings[title] = {k: v for k, v in info.items() if k.endswith("_seconds")}
        # a baseline's total_seconds already sums its other parts: listing it would count them twice
        cost = {"run": run_id, "wall_seconds": wall,
                "parts": {k: v for k, v in timings[title].items() if k != "total_seconds"}}
        write_report(report_dir, title, result.results, {**meta, "timings_s": timings}, diagnostics={"cost": cost})
        run_diagnostics(c, method, title, settings, model, params, unlearned, processor, bench, ecfg, result.results,
                        report_dir, done.get(title, {}), family=config.model_type, log=log)
    log(f"report: {report_dir / 'report.md'}")
    return report_dir


DIAGNOSTICS_VERSION = 1  # bump when a diagnostic's code changes what a cached entry would hold


def diagnostic_key(c, method: str, kind: str, settings: dict) -> str:
    """A hash of everything a method's diagnostic depends on: the config (its `diagnostics` section aside),
    the method, and this kind's own settings (`kind` and `kind_*` entries)."""
    config = json.loads(c.to_json_best_effort()) if hasattr(c, "to_json_best_effort") else dict(c)
    config.pop("diagnostics", None)
    own = {k: v for k, v in settings.items() if k == kind or k.startswith(kind + "_")}
    blob = json.dumps({"version": DIAGNOSTICS_VERSION, "config": config, "method": method, "kind": kind,
                       "settings": own}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def relearn_config(c, settings: dict):
    """The relearning attack's settings from the diagnostics settings; max_length 0 = VL-Eraser stage 1's."""
    from ..eval.diagnostics import RelearnConfig

    max_length = settings["relearn_max_length"] or method_config(c, "vl_eraser")[2].max_length
    return RelearnConfig(steps=settings["relearn_steps"], learning_rate=settings["relearn_learning_rate"],
                         batch_size=settings["relearn_batch_size"], max_length=max_length,
                         trainable=settings["relearn_trainable"], seed=c.seed)


def run_diagnostics(c, method: str, title: str, settings: dict, model, vanilla, unlearned, processor, bench, ecfg,
                    results, report_dir, done: dict, *, family: str | None = None, log=print) -> dict:
    """The enabled diagnostics (`settings`) of one unlearned model, each written into the report as soon as it
    is done, so an interrupted run keeps the finished ones. One found in `done` (this method's stored
    diagnostics) with the same `diagnostic_key` is skipped. results: the method's main evaluation (its
    forget/retain scores are the diagnostics' unlearned baseline). Returns the entries computed now."""
    from ..eval import diagnostics as dg
    from ..eval.report import write_diagnostics

    computed = {}
    for kind in dg.KINDS:
        if not settings[kind]:
            continue
        key = diagnostic_key(c, method, kind, settings)
        if done.get(kind, {}).get("key") == key:
            log(f"{title}: {kind} diagnostic already in the report, skipped")
            continue
        t0 = time.perf_counter()
        if kind == "relearn" and len(bench.forget) < 2:  # recorded, so the report says why it is missing
            entry = {"skipped": f"the relearning attack needs at least 2 forget people to split, the benchmark "
                                f"has {len(bench.forget)}"}
            log(f"{title}: relearn diagnostic not run: {entry['skipped']}")
        else:
            log(f"{title}: {kind} diagnostic")
            if kind == "reload":
                entry = dg.reload_diagnostic(model, unlearned, vanilla, processor, bench, ecfg, baseline=results,
                                             family=family)
            elif kind == "quantize":
                entry = dg.quantization_attack(model, unlearned, processor, bench, ecfg,
                                               bits=settings["quantize_bits"], baseline=results)
            else:
                entry = dg.relearning_attack(model, unlearned, processor, bench, ecfg, relearn_config(c, settings),
                                             sharding=sharder_for(c))
        entry.update(key=key, seconds=time.perf_counter() - t0)
        write_diagnostics(report_dir, title, {kind: entry})
        computed[kind] = entry
    return computed


SWEEP_METRICS = ("cloze", "classification")


def mean_over_modes(results, set_name: str, metric: str) -> float:
    """A set's score for one metric, averaged over the Visual-QA and Textual-QA modes."""
    modes = results.get(set_name, {})
    values = [m[metric]["value"] for m in modes.values() if metric in m]
    return float(np.mean(values)) if values else float("nan")


def with_method_settings(c, method: str, setting: dict):
    """A copy of config `c` with `setting` applied where `run_method` reads it: a VL-Eraser variant's fields
    go to `c.vl_eraser`, a baseline's (its own and optimizer basics alike) to `c.baselines.<method>`."""
    import ml_collections

    from .baselines import BASELINES, BaselineConfig

    out = ml_collections.ConfigDict(c.to_dict() if hasattr(c, "to_dict") else dict(c))
    stage_fields = {f.name for f in dataclasses.fields(StageOneConfig)}
    if method in METHODS:
        known = stage_fields | {f.name for f in dataclasses.fields(vle.VLEraserConfig)}
        unknown = set(setting) - known
        if unknown:
            raise ValueError(f"{method}: unknown settings {sorted(unknown)} (VLEraserConfig/StageOneConfig fields)")
        out.vl_eraser = {**_section(out, "vl_eraser"), **setting}
        return out
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; known: {all_methods()}")
    unknown = set(setting) - {f.name for f in dataclasses.fields(BaselineConfig)} - stage_fields
    if unknown:
        raise ValueError(f"{method}: unknown settings {sorted(unknown)} (BaselineConfig/StageOneConfig fields)")
    section = _section(out, "baselines")
    section[method] = {**dict(section.get(method, {})), **setting}
    out.baselines = section
    return out


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
    import itertools

    from ..eval.evaluate import evaluate
    from ..finetune import data_root, run_stage
    from ..processing import load_processor

    if metric not in SWEEP_METRICS:
        raise ValueError(f"sweep metric must be one of {SWEEP_METRICS}, got {metric!r}")
    vanilla_dir = run_stage(c, "vanilla", log=log)
    model, params, _ = load_vanilla(c, vanilla_dir)
    processor = load_processor(vanilla_dir)
    bench = validation_benchmark(mllmu.load_benchmark(data_root(c), c.data.forget_ratio), validation_people, c.seed)
    ecfg = dataclasses.replace(eval_config(c), sets=("forget", "retain"), tasks=(metric,), loglik=False,
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
        _, unlearned, _ = run_method(with_method_settings(c, method, setting), method, model, params, processor,
                                     bench, log=lambda *_: None)
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
