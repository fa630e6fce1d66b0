"""The demo's up-front plan and estimate, and its closing time breakdown."""

from __future__ import annotations

from pathlib import Path

import pytest

from vleraser_jax.config import load_config
from vleraser_jax.experiment import overview
from vleraser_jax.train.workspace import stage_dir

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_llava.py"


def _estimate_minutes(text: str) -> float:
    """The slow end of the estimate's range; the fast end is checked to be the measured fraction of it."""
    line = next(l for l in text.splitlines() if "estimated" in l)
    fast, slow = (float(x) for x in line.split("estimated")[1].split("min")[0].split("-"))
    assert fast == pytest.approx(slow * overview.FAST_MACHINE_FRACTION, abs=1.0)  # each end rounded to a minute
    return slow


def test_plan_trains_missing_stages_and_reuses_cached_ones(tmp_path):
    c = load_config(CONFIG, [f"--config.work_dir={tmp_path}"])
    methods = ["vl_eraser", "npo"]
    fresh = overview.describe_run(c, methods, None)
    assert f"base     train, {c.base.steps} steps" in fresh and f"oracle   train, {c.oracle.steps} steps" in fresh
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


def test_concurrent_methods_shorten_only_the_methods_part_of_the_estimate(tmp_path):
    c = load_config(CONFIG, [f"--config.work_dir={tmp_path}"])
    for stage in ("base", "oracle", "vanilla"):
        stage_dir(c, stage).mkdir(parents=True)
        (stage_dir(c, stage) / "config.json").write_text("{}")
    methods = ["vl_eraser", "npo", "ga", "gd"]
    references = (2 + bool(c.eval.get("base_row", False))) * overview.SECONDS_PER_EVALUATION
    per_method = overview.SECONDS_PER_METHOD + overview.SECONDS_PER_EVALUATION + overview.SECONDS_PER_DIAGNOSTICS
    one = overview.describe_run(c, methods, None, workers=1)
    two = overview.describe_run(c, methods, None, workers=2)
    assert "at a time" not in one and "(2 at a time)" in two
    assert _estimate_minutes(one) == pytest.approx((references + len(methods) * per_method) / 60, abs=0.5)
    assert _estimate_minutes(two) == pytest.approx(
        (references + len(methods) * per_method / overview.CONCURRENT_SPEEDUP) / 60, abs=0.5)


def test_inner_parts_are_listed_under_their_part_and_not_added_to_the_total():
    t = overview.Timings()
    with t.part("base stage"):
        pass
    t.parts["base stage"] = 10.0
    t.parts["2 methods on 2 worker processes"] = 30.0
    t.add_inner("2 methods on 2 worker processes", "ga: unlearn", 20.0)
    t.add_inner("2 methods on 2 worker processes", "npo: unlearn", 25.0)
    lines = t.table().splitlines()
    at = lines.index(next(l for l in lines if l.strip().startswith("2 methods")))
    assert "overlapping" in lines[at + 1]
    assert lines[at + 2].split()[:3] == ["ga:", "unlearn", "20.0"] and lines[at + 3].split()[1] == "unlearn"
    assert lines[-1].split()[1] == "40.0"
