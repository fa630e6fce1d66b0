"""bench/data_parallel_cpu.py's summary: throughput after warm-up, ratios paired by round, loss gaps."""

from __future__ import annotations

import pytest

from bench.data_parallel_cpu import format_table, run, summarize, throughput


def _records(rate_late: float, losses: list[float]) -> list[dict]:
    # step 10 is warm-up (compilation) and must not count; steps 20..40 run at rate_late
    return [{"step": 10 * (i + 1), "examples_per_s": 1.0 if i == 0 else rate_late, "loss": loss}
            for i, loss in enumerate(losses)]


def test_summary_pairs_rounds_and_skips_warmup():
    runs = [{"round": 0, "devices": 1, "records": _records(100.0, [3.0, 2.0, 1.0, 0.5])},
            {"round": 0, "devices": 2, "records": _records(120.0, [3.0, 2.0, 1.001, 0.5])},
            {"round": 1, "devices": 1, "records": _records(80.0, [3.0, 2.0, 1.0, 0.5])},
            {"round": 1, "devices": 2, "records": _records(120.0, [3.0, 2.0, 1.0, 0.5])}]
    assert throughput(runs[0]["records"], 40) == 100.0
    one, two = summarize(runs, 40)
    assert one["ratio"] == 1.0 and one["max_loss_gap"] == 0.0
    assert two["ratio"] == pytest.approx((1.2 + 1.5) / 2) and two["ratio_min"] == pytest.approx(1.2)
    assert two["ratio_max"] == pytest.approx(1.5) and two["max_loss_gap"] == pytest.approx(1e-3)
    assert "| 2 | 2 | 120.0 | 1.35 (1.20–1.50) |" in format_table([one, two], "base", 40)


def test_bad_arguments_are_refused_before_training():
    with pytest.raises(ValueError, match="must include 1"):
        run("configs/tiny_llava.py", [], "base", 400, [2, 4], 1, log=lambda *_: None)
    with pytest.raises(ValueError, match="--steps >= 8"):
        run("configs/tiny_llava.py", [], "base", 4, [1, 2], 1, log=lambda *_: None)
    with pytest.raises(ValueError, match="no logged step"):
        throughput([{"step": 5, "examples_per_s": 1.0, "loss": 1.0}], 40)
