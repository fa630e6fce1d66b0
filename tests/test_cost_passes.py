"""bench/cost_passes.py: pass counts over D_f, the settings that equalise them, and the ratio summary."""

from __future__ import annotations

import math

import pytest

from bench import cost_passes as cp
from vleraser_jax.config import load_config
from vleraser_jax.experiment.methods import with_method_settings


@pytest.fixture(scope="module")
def config():
    return load_config("configs/tiny_llava.py", [])


def test_passes_follow_the_settings(config):
    c = with_method_settings(config, "vl_eraser", {"steps": 30, "batch_size": 8})
    assert cp.passes_of(c, "vl_eraser", 120) == pytest.approx(30 * 8 / 120)
    assert cp.passes_of(with_method_settings(config, "gd", {"epochs": 2.5}), "gd", 120) == 2.5
    # counted in steps: forget steps over D_f's batches (batch 4: 30 per epoch of 120 rows)
    assert cp.passes_of(with_method_settings(config, "ga", {"epochs": None, "steps": 45}), "ga", 120) == 1.5
    assert cp.passes_of(with_method_settings(config, "npo", {"epochs": None, "steps": 60}), "npo", 120, 400) == 2.0
    # MMUnlearner interleaves one forget step per 100 // 30 = 3 retain steps: 40 steps hold 10 forget ones
    mm = with_method_settings(config, "mmunlearner", {"epochs": None, "steps": 40})
    assert cp.passes_of(mm, "mmunlearner", 120, 400) == pytest.approx(10 / 30)


@pytest.mark.parametrize("method", ["vl_eraser", "vl_eraser_paper", "ga", "npo", "mmunlearner"])
@pytest.mark.parametrize("passes", [0.5, 1.0, 3.0])
def test_the_equal_pass_setting_reads_d_f_that_many_times(config, method, passes):
    rows = 225
    setting = cp.setting_for_passes(config, method, passes, rows)
    got = cp.passes_of(with_method_settings(config, method, setting), method, rows)
    # steps round up to whole batches: never fewer passes, at most one batch more
    assert passes <= got < passes + config.vl_eraser.batch_size / rows + 1e-12
    with pytest.raises(ValueError, match="passes"):
        cp.setting_for_passes(config, method, 0.0, rows)


def test_shares_group_the_timed_parts():
    info = {"vacuum_seconds": 2.0, "distill_seconds": 6.0, "delete_seconds": 1.0, "history": [1, 2]}
    assert cp.shares(info) == {"statistics": 2.0, "training": 6.0, "deletion": 1.0}
    base = {"data_seconds": 0.5, "mask_seconds": 3.0, "train_seconds": 10.0, "merge_seconds": 0.5,
            "total_seconds": 14.0}  # total_seconds sums the others: not counted again
    assert cp.shares(base) == {"statistics": 3.5, "training": 10.0, "deletion": 0.5}


def _record(k, method, kind, wall, passes=1.0):
    return {"round": k, "method": method, "kind": kind, "setting": {}, "passes": passes, "wall_s": wall,
            "shares": {"statistics": 1.0, "training": 3.0, "deletion": 0.0}}


def test_ratios_are_per_round_against_npo_and_warm_excludes_round_one():
    walls = {"npo": [20.0, 10.0, 12.0], "ga": [8.0, 4.0, 3.0]}
    records = [_record(k, m, kind, w[k]) for kind in ("chosen", "equal") for m, w in walls.items() for k in range(3)]
    rows = {(r["method"], r["kind"]): r for r in cp.summarize(records)}
    ga = rows[("ga", "equal")]
    assert ga["ratio"] == pytest.approx(0.4)  # median of 0.4, 0.4, 0.25
    assert (ga["ratio_min"], ga["ratio_max"]) == (pytest.approx(0.25), pytest.approx(0.4))
    assert ga["cold_s"] == 8.0 and ga["warm_s"] == pytest.approx(3.5)
    assert rows[("npo", "chosen")]["ratio"] == 1.0
    assert ga["share_training"] == pytest.approx(0.75) and ga["share_statistics"] == pytest.approx(0.25)
    table = cp.format_table(list(rows.values()), 225, 15)
    assert "225 rows of 15 forget people" in table and "| equal passes | ga | 1.00 | 8.0 | 3.5 | 0.40 (0.25–0.40)" in table


def test_one_round_has_no_warm_time():
    rows = cp.summarize([_record(0, "npo", "chosen", 5.0)])
    assert math.isnan(rows[0]["warm_s"]) and "| 5.0 | – |" in cp.format_table(rows, 10, 1)


def test_the_reference_must_be_among_the_methods(config):
    with pytest.raises(ValueError, match="npo"):
        cp.run(config, ["ga"], 1.0, 1)
    with pytest.raises(ValueError, match="rounds"):
        cp.run(config, ["npo"], 1.0, 0)
