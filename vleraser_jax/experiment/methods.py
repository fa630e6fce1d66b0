"""The methods a config can run, by name: VL-Eraser's variants and the five baselines, their settings read from
the config's `vl_eraser` / `baselines` sections, and one function that runs any of them."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import ml_collections

from ..eval.evaluate import EvalConfig
from ..parallel import sharder_for
from ..train.workspace import tensorboard_on
from ..unlearn import vl_eraser as vle
from ..unlearn.baselines import BASELINES, BaselineConfig, baseline_config, reference_run_settings, unlearn_baseline
from ..unlearn.trainer import LOG_NAME, RunSettings

# The paper's choices where it states them (retain image representations, pooled; AlphaEdit's absolute 2e-2
# threshold; the plain deletion ΔW), our reading where it does not (every forget token distilled).
PAPER_CHOICES = {"vacuum_source": "image", "pooling": "mean", "threshold_mode": "absolute", "threshold": 2e-2,
                 "distill_tokens": "all", "deletion_scale": "raw"}
METHODS = {
    # name: (name in the report, the config section its settings come from, fixed VLEraserConfig changes)
    "vl_eraser": ("VL-Eraser", "vl_eraser", {}),
    "vl_eraser_paper": ("VL-Eraser (paper)", "vl_eraser_paper", PAPER_CHOICES),
    "vl_eraser_no_vacuum": ("VL-Eraser w/o vacuum (P = I)", "vl_eraser", {"vacuum": False}),
    "vl_eraser_no_distill": ("VL-Eraser w/o distill (λ = 0)", "vl_eraser", {"lambda_": 0.0}),
    "vl_eraser_no_ce": ("VL-Eraser w/o CE (λ = 1)", "vl_eraser", {"lambda_": 1.0}),
    "vl_eraser_raw_deletion": ("VL-Eraser, raw deletion (c_l = 1)", "vl_eraser", {"deletion_scale": "raw"}),
}
RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunSettings))


@dataclasses.dataclass
class MethodRun:
    """One method's result: the unlearned parameters, its info (timings, history, settings), the LoRA it trained
    (VL-Eraser's is the one it deleted, a baseline's the one it merged; None for full-parameter training) and
    VL-Eraser's vacuum projectors."""

    title: str
    params: Any
    info: dict
    lora: Any = None
    vacuum: Any = None


def all_methods() -> list[str]:
    return sorted(METHODS) + sorted(BASELINES)


def section(c, name: str) -> dict:
    """A config section as a plain dict ({} when absent)."""
    found = c.get(name) if hasattr(c, "get") else None
    return dict(found) if found is not None else {}


def training_logs(c, run_dir) -> dict:
    """The trainer's log paths for a method run in `run_dir`: `train.jsonl` and, with `c.log.tensorboard`,
    `tensorboard/`; a previous run's logs there are removed (method runs start afresh, they never resume)."""
    tensorboard = tensorboard_on(c)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOG_NAME).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    return {"log_path": str(run_dir / LOG_NAME),
            "tensorboard_dir": str(run_dir / "tensorboard") if tensorboard else None}


def run_method(c, method: str, model, params, processor, bench, *, log=print, run_dir=None) -> MethodRun:
    """One method by name (VL-Eraser variant or baseline) on `bench`'s forget set, with the config's settings.

    run_dir: where the method's training logs go (`training_logs`); None: no logs (sweeps)."""
    sharding = sharder_for(c)
    logs = training_logs(c, run_dir) if run_dir is not None else {}
    if method in METHODS:
        title, cfg, run = method_config(c, method)
        unlearned, lora, projectors, info = vle.unlearn_vl_eraser(
            model, params, processor, bench.forget_train, bench.retain_train, cfg, run,
            entity_names={p.person_id: p.name for p in bench.forget}, sharding=sharding, log=log, **logs)
        return MethodRun(title, unlearned, info, lora, projectors)
    title, settings, run = baseline_method_config(c, method)
    unlearned, lora, info = unlearn_baseline(model, params, processor, bench.forget_train, bench.retain_train, method,
                                             settings, run, full_rows=bench.full_train, sharding=sharding, log=log,
                                             **logs)
    return MethodRun(title, unlearned, info, lora)


def method_title(c, method: str) -> str:
    """The method's name in the report."""
    return METHODS[method][0] if method in METHODS else baseline_method_config(c, method)[0]


def baseline_method_config(c, method: str) -> tuple[str, BaselineConfig, RunSettings]:
    """(title, BaselineConfig, RunSettings) of a baseline: `c.baselines.<method>` holds its BaselineConfig fields
    and RunSettings fields that override the shared `c.baselines.run` (absent: the 7B reference values)."""
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; known: {all_methods()}")
    baselines = section(c, "baselines")
    own = dict(baselines.get(method, {}))
    title, settings = baseline_config(method, {k: v for k, v in own.items() if k not in RUN_FIELDS})
    run = reference_run_settings(method, **{**dict(baselines.get("run", {})),
                                            **{k: v for k, v in own.items() if k in RUN_FIELDS}, "seed": c.seed})
    return title, settings, run


def method_config(c, method: str) -> tuple[str, vle.VLEraserConfig, RunSettings]:
    """(title, VLEraserConfig, RunSettings) of a VL-Eraser variant: `c.vl_eraser`, then its own section's
    settings (`c.vl_eraser_paper` for the paper row), then the variant's fixed changes."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    title, own, changes = METHODS[method]
    fields = {f.name for f in dataclasses.fields(vle.VLEraserConfig)}
    values = {**section(c, "vl_eraser"), **(section(c, own) if own != "vl_eraser" else {})}
    cfg = vle.VLEraserConfig(**{k: (tuple(v) if k == "layers" and v is not None else v)
                                for k, v in values.items() if k in fields})
    run = RunSettings(**{k: v for k, v in values.items() if k in RUN_FIELDS and k != "seed"}, seed=c.seed)
    return title, dataclasses.replace(cfg, **changes), run


def effective_settings(c, method: str) -> dict[str, Any]:
    """Every setting `run_method` will use for `method` (its method config and optimizer run, flattened)."""
    _, cfg, run = method_config(c, method) if method in METHODS else baseline_method_config(c, method)
    return {**dataclasses.asdict(run), **dataclasses.asdict(cfg)}


def eval_config(c) -> EvalConfig:
    e = c.eval
    # absent: the protocol's values (eval.py's own letter rule and exemplars are the 7B configs' choice)
    optional = {k: e[k] for k in ("max_new_tokens", "letter_rule", "likelihood_max_length", "bootstrap_resamples")
                if k in e}
    return EvalConfig(batch_size=e.batch_size, max_people=e.max_people or None, few_shot_people=e.few_shot_people,
                      seed=c.seed, **optional)


def with_method_settings(c, method: str, setting: dict):
    """A copy of config `c` with `setting` applied where `run_method` reads it: a VL-Eraser variant's fields
    go to `c.vl_eraser`, a baseline's (its own and RunSettings fields alike) to `c.baselines.<method>`."""
    out = ml_collections.ConfigDict(c.to_dict() if hasattr(c, "to_dict") else dict(c))
    if method in METHODS:
        known = RUN_FIELDS | {f.name for f in dataclasses.fields(vle.VLEraserConfig)}
        unknown = set(setting) - known
        if unknown:
            raise ValueError(f"{method}: unknown settings {sorted(unknown)} (VLEraserConfig/RunSettings fields)")
        own = METHODS[method][1]
        out[own] = {**section(out, own), **setting}
        return out
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; known: {all_methods()}")
    unknown = set(setting) - {f.name for f in dataclasses.fields(BaselineConfig)} - RUN_FIELDS
    if unknown:
        raise ValueError(f"{method}: unknown settings {sorted(unknown)} (BaselineConfig/RunSettings fields)")
    baselines = section(out, "baselines")
    baselines[method] = {**dict(baselines.get(method, {})), **setting}
    out.baselines = baselines
    return out
