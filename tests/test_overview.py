"""The demo's up-front plan and estimate, and its closing time breakdown."""

from __future__ import annotations

from pathlib import Path

import pytest

from vleraser_jax.config import load_config
from vleraser_jax.experiment import overview
from vleraser_jax.train.workspace import stage_dir

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_llava.py"


def _estimate_minutes(text: str) -> float:
    line = next(l for l in text.splitlines() if "estimated" in l)
    return float(line.split("estimated")[1].split("min")[0])


def test_plan_trains_missing_stages_and_reuses_cached_ones(tmp_path):
    c = load_config(CONFIG, [f"--config.work_dir={tmp_path}"])
    methods = ["vl_eraser", "npo"]
    fresh = overview.describe_run(c, methods, None)
    assert "base     train, 3000 steps" in fresh and "oracle   train, 3000 steps" in fresh
    steps = {"base": c.base.steps, "oracle": c.oracle.steps, "vanilla": c.vanilla.steps}
    training = sum(overview.SECONDS_PER_STEP[s] * n for s, n in steps.items())
    evaluations = (2 + bool(c.eval.get("base_row", False)) + len(methods)) * overview.SECONDS_PER_EVALUATION
    methods_s = len(methods) * overview.SECONDS_PER_METHOD
    diagnostics_s = len(methods) * overview.SECONDS_PER_DIAGNOSTICS
    assert _estimate_minutes(fresh) == pytest.approx((training + evaluations + methods_s + diagnostics_s) / 60,
                                                     abs=0.5)

    for stage in steps:  # a cached stage is one with a config.json; reusing it costs nothing
        stage_dir(c, stage).mkdir(parents=True)
        (stage_dir(c, stage) / "config.json").write_text("{}")
    cached = overview.describe_run(c, methods, {"reload": False})
    assert "base     reuse" in cached and "diagnostics: none" in cached
    assert _estimate_minutes(cached) == pytest.approx((evaluations + methods_s) / 60, abs=0.5)


def test_timings_add_up_repeated_parts_in_order():
    t = overview.Timings()
    for name in ("base stage", "npo: unlearn", "base stage"):
        with t.part(name):
            pass
    assert list(t.parts) == ["base stage", "npo: unlearn"]
    lines = t.table().splitlines()
    assert lines[0] == "time breakdown:" and lines[-1].split()[0] == "total"
    with pytest.raises(RuntimeError):
        with t.part("fails"):
            raise RuntimeError("boom")
    assert "fails" in t.parts  # a failed part still shows where its time went
