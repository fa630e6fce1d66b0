"""Running the enabled diagnostics of one unlearned model, each cached in the report by a key of what it depends on."""

from __future__ import annotations

import hashlib
import json
import time

from ..eval import diagnostics as dg
from ..eval.report import write_diagnostics
from ..parallel import sharder_for
from .methods import method_config


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


def relearn_config(c, settings: dict) -> dg.RelearnConfig:
    """The relearning attack's settings from the diagnostics settings; max_length 0 = VL-Eraser distillation's."""
    max_length = settings["relearn_max_length"] or method_config(c, "vl_eraser")[2].max_length
    return dg.RelearnConfig(steps=settings["relearn_steps"], learning_rate=settings["relearn_learning_rate"],
                         batch_size=settings["relearn_batch_size"], max_length=max_length,
                         trainable=settings["relearn_trainable"], seed=c.seed)


def run_diagnostics(c, method: str, title: str, settings: dict, model, vanilla, unlearned, processor, bench, ecfg,
                    results, report_dir, done: dict, *, family: str | None = None, log=print) -> dict:
    """The enabled diagnostics (`settings`) of one unlearned model, each written into the report as soon as it
    is done, so an interrupted run keeps the finished ones. One found in `done` (this method's stored
    diagnostics) with the same `diagnostic_key` is skipped. results: the method's main evaluation (its
    forget/retain scores are the diagnostics' unlearned baseline). Returns the entries computed now."""
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
            entry = _diagnostic(c, kind, settings, model, vanilla, unlearned, processor, bench, ecfg, results, family)
        entry.update(key=key, seconds=time.perf_counter() - t0)
        write_diagnostics(report_dir, title, {kind: entry})
        computed[kind] = entry
    return computed


def _diagnostic(c, kind: str, settings: dict, model, vanilla, unlearned, processor, bench, ecfg, results, family):
    if kind == "reload":
        return dg.reload_diagnostic(model, unlearned, vanilla, processor, bench, ecfg, baseline=results, family=family)
    if kind == "quantize":
        return dg.quantization_attack(model, unlearned, processor, bench, ecfg, bits=settings["quantize_bits"],
                                      baseline=results)
    return dg.relearning_attack(model, unlearned, processor, bench, ecfg, relearn_config(c, settings),
                                sharding=sharder_for(c))
