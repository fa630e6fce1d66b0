"""The whole pipeline on a micro config: synthetic data -> base -> vanilla -> VL-Eraser + a baseline -> report.

Marked slow (XLA compiles dominate); CI runs it through `make test-slow`.
"""

from __future__ import annotations

import json
import shutil

import pytest

from vleraser_jax.config import load_config
from vleraser_jax.experiment.runner import run_experiment
from vleraser_jax.experiment.runner import load_selections
import vleraser_jax.experiment.dose_study as dose_module
from vleraser_jax.experiment.dose_study import run_dose_study, write_dose_study
from vleraser_jax.experiment.sweep import run_sweep
from vleraser_jax.train.stages import run_stage
from vleraser_jax.train.workspace import stage_dir

MICRO = [
    "--config.data.num_people=20", "--config.data.num_celebrities=4", "--config.data.image_size=16",
    "--config.model.patch_size=8", "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.layers=2", "--config.model.heads=2", "--config.model.kv_heads=1",
    "--config.model.vision_hidden_size=16", "--config.model.vision_intermediate_size=32",
    "--config.model.vision_layers=2", "--config.model.vision_heads=2",
    "--config.base.steps=3", "--config.base.batch_size=4", "--config.vanilla.steps=3", "--config.vanilla.batch_size=4",
    "--config.oracle.steps=3", "--config.oracle.batch_size=4", "--config.data.validation_people=2",
    "--config.eval.max_people=1", "--config.eval.batch_size=8",
]


@pytest.mark.slow
def test_micro_pipeline_end_to_end(tmp_path, monkeypatch):
    c = load_config("configs/tiny_llava.py", MICRO + [f"--config.work_dir={tmp_path}"])
    c.vl_eraser = {"steps": 2, "batch_size": 4, "rank": 2}
    c.baselines = {"run": {"batch_size": 8, "learning_rate": 1e-4}}
    report_dir = run_experiment(c, ["vl_eraser", "ga"], log=lambda *_: None)
    methods = json.loads((report_dir / "results.json").read_text())["methods"]
    assert list(methods) == ["Vanilla", "Oracle", "Base", "VL-Eraser", "GA"]  # the references first (#17)
    for results in methods.values():
        assert set(results) == {"forget", "test", "retain", "real"}
    assert (report_dir / "runs" / "vl_eraser" / "model" / "config.json").exists()
    assert (report_dir / "runs" / "vl_eraser" / "artifacts" / "meta.json").exists()
    for method in ("vl_eraser", "ga"):  # every LoRA run: its PEFT adapter and its training log
        assert (report_dir / "runs" / method / "adapter" / "adapter_model.safetensors").exists()
        assert (report_dir / "runs" / method / "train.jsonl").read_text().count("\n") >= 1
    _same_report_on_two_worker_processes(c, report_dir, ["vl_eraser", "ga"])
    # the cached stages are reused, not retrained
    before = stage_dir(c, "vanilla").stat().st_mtime
    assert run_stage(c, "vanilla", log=lambda *_: None) == stage_dir(c, "vanilla")
    assert stage_dir(c, "vanilla").stat().st_mtime == before

    # the selection scores settings on pseudo-forget retain people; deleting with α 0 is the vanilla model
    out = run_sweep(c, {"deletion_strength": [0.0, 1.0]}, budget=2, log=lambda *_: None)
    rows = out["rows"]
    assert [r["setting"]["deletion_strength"] for r in rows] == [0.0, 1.0]
    assert rows[0]["eligible"] and all(d == pytest.approx(0.0, abs=1e-12) for d in rows[0]["drops"].values())
    assert rows[0]["distance"] == pytest.approx(out["references"]["oracle"]["vanilla_distance"])
    assert out["validation_people"] == 2 and (out["chosen"] in (0, 1) or out["eligible"] == 0)
    assert load_selections(c)["vl_eraser"]["rows"] == json.loads(json.dumps(rows))
    # a rerun (say after a kill) reuses the finished trials instead of training them again
    import vleraser_jax.experiment.sweep as sweep_module

    def no_training(*_, **__):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr(sweep_module, "run_method", no_training)
    again = run_sweep(c, {"deletion_strength": [0.0, 1.0]}, budget=2, log=lambda *_: None)
    assert json.loads(json.dumps(again["rows"])) == json.loads(json.dumps(rows))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="budget"):
        run_sweep(c, {"deletion_strength": [1.0]}, budget=2)
    # the same protocol for a baseline: learning rate 0 leaves the model as it was
    out = run_sweep(c, {"learning_rate": [0.0]}, method="ga", budget=1, log=lambda *_: None)
    assert out["rows"][0]["distance"] == pytest.approx(out["references"]["oracle"]["vanilla_distance"])

    # matched doses on the reported people: at learning rate 0 GA and NPO are Vanilla, so they pair with no
    # difference at all; a rerun reads the journal instead of training again
    study = run_dose_study(c, ["ga", "npo"], 0.0, [2, 1], max_people=2, log=lambda *_: None)
    assert [(r["method"], r["steps"]) for r in study["rows"]] == [("ga", 1), ("ga", 2), ("npo", 1), ("npo", 2)]
    for row in study["rows"]:
        assert row["results"] == study["references"]["Vanilla"]["results"]
    assert [(c_["first"], c_["second"], c_["steps"]) for c_ in study["comparisons"]] == [("ga", "npo", 1),
                                                                                       ("ga", "npo", 2)]
    for comparison in study["comparisons"]:
        assert comparison["differences"] and all(d["value"] == 0.0 and d["p_value"] == 1.0
                                                 for d in comparison["differences"].values())
    monkeypatch.setattr(dose_module, "run_method", no_training)
    assert run_dose_study(c, ["ga", "npo"], 0.0, [1, 2], max_people=2, log=lambda *_: None)["rows"] == study["rows"]
    monkeypatch.undo()
    path = write_dose_study(c, study)
    assert path.exists() and (path.parent / "dose_study.png").exists() and "NPO − GA" in path.read_text()


def _without_timings(obj):
    """A report with what measures time (and the run it was measured in) left out."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items()
                if k not in ("cost", "timings_s", "seconds") and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _same_report_on_two_worker_processes(c, report_dir, methods):
    """The methods run again on 2 worker processes write the report one process wrote: the same numbers, the
    same per-item scores, the methods in the same order; each method's output in its own log."""
    single = json.loads((report_dir / "results.json").read_text())
    items = {p.name: p.read_text() for p in report_dir.glob("items-*.jsonl")}
    shutil.rmtree(report_dir)
    assert run_experiment(c, methods, workers=2, log=lambda *_: None) == report_dir
    pooled = json.loads((report_dir / "results.json").read_text())
    assert list(pooled["methods"]) == list(single["methods"])
    assert _without_timings(pooled) == _without_timings(single)
    assert {p.name: p.read_text() for p in report_dir.glob("items-*.jsonl")} == items
    for method in methods:
        assert (report_dir / "runs" / method / "output.log").read_text().startswith(f"== {method} (worker process")
    assert pooled["diagnostics"]["GA"]["cost"]["concurrent_workers"] == 2
    assert not (report_dir / ".concurrent").exists()


@pytest.mark.slow
def test_micro_pipeline_on_qwen2vl(tmp_path):
    """The same pipeline on tiny_qwen2vl (chat-template prompts, patch + grid image inputs, merger as the
    projector): both stages, VL-Eraser and MMUnlearner, every diagnostic, the report."""
    micro = [o for o in MICRO if "patch_size" not in o] + ["--config.model.patch_size=4",
                                                          "--config.model.mrope_section=(2,3,3)"]
    c = load_config("configs/tiny_qwen2vl.py", micro + [f"--config.work_dir={tmp_path}"])
    c.vl_eraser = {"steps": 2, "batch_size": 4, "rank": 2}
    c.baselines = {"run": {"batch_size": 8, "learning_rate": 1e-4}}
    c.diagnostics = {"relearn_steps": 2, "quantize_bits": (8,)}
    report_dir = run_experiment(c, ["vl_eraser", "mmunlearner"], log=lambda *_: None)
    results = json.loads((report_dir / "results.json").read_text())
    assert list(results["methods"]) == ["Vanilla", "Oracle", "Base", "VL-Eraser", "MMUnlearner"]
    for results_of_method in results["methods"].values():
        assert set(results_of_method) == {"forget", "test", "retain", "real"}
    diagnostics = results["diagnostics"]
    assert diagnostics["VL-Eraser"]["reload"]["family"] == "qwen2_vl"
    runs = report_dir / "runs"
    assert (runs / "vl_eraser" / "adapter" / "adapter_config.json").exists()
    assert (runs / "mmunlearner" / "info.json").exists() and not (runs / "mmunlearner" / "adapter").exists()
    assert {"reload", "quantize", "relearn", "cost"} <= set(diagnostics["MMUnlearner"])
    report = (report_dir / "report.md").read_text()
    for heading in ("## Diagnostic: vanilla modules reloaded", "## Attack: weight quantization", "## Cost"):
        assert heading in report, heading
