"""bench/eval_speed.py on a toy config: both prefills agree at the last position, both length buckets give the same
answers, and the table lists every prompt shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import eval_speed
from vleraser_jax.cli import pipeline_config

from test_train_stages import CONFIG, TOY


@pytest.mark.slow  # trains the three toy stages, then generates every answer four times
def test_bench_rows_agree_and_the_table_lists_every_shape(tmp_path):
    c = pipeline_config(CONFIG, [f"--config.{o}" for o in TOY] + [f"--config.work_dir={tmp_path}",
                                                                   "--config.eval.max_people=4"])
    result = eval_speed.run(c, rounds=1, reps=1, log=lambda *_: None)
    assert result["last_logits_max_rel_gap"] < 1e-5
    assert result["same_answers"] == result["prompts"] > 0
    prefill = [r for r in result["rows"] if r["what"].startswith("prefill")]
    assert prefill and all(r["before"] > 0 and r["after"] > 0 for r in result["rows"])
    table = eval_speed.format_table(result)
    assert all(f"| {r['what']} |" in table for r in result["rows"])
