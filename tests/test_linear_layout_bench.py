"""bench/linear_layout.py times the demo's training steps with two forms of Dense's product: check both forms
train to the same loss on those steps, and the table lists every step."""

from __future__ import annotations

import pytest

from bench import linear_layout
from vleraser_jax.config import load_config


@pytest.mark.slow  # ~1 min of compiles
def test_both_forms_give_the_same_step_and_the_table_lists_every_step(tmp_path, capsys):
    import numpy as np

    from vleraser_jax.models import layers
    from vleraser_jax.unlearn import trainer as tr

    c = load_config("configs/tiny_llava.py", [f"--config.work_dir={tmp_path}", "--config.base.steps=40"])
    steps, tx = linear_layout._steps(c)
    assert len(steps) >= 3 and any(name.startswith("LoRA") for name in steps)
    name, (loss_fn, trainable, frozen, batch) = next(iter(steps.items()))
    losses = {}
    original = layers._linear_rows
    try:
        for form, fn in (("batched", linear_layout.batched_linear), ("rows", original)):
            layers._linear_rows = fn
            step = tr.make_train_step(loss_fn, tx)
            state = tr.init_state(trainable, tx, 0)
            for _ in range(2):
                state, metrics = step(state, frozen, batch)
            losses[form] = (float(metrics["loss"]), float(metrics["grad_norm"]))
    finally:
        layers._linear_rows = original
    np.testing.assert_allclose(losses["batched"], losses["rows"], rtol=1e-5)
    result = linear_layout.run(c, rounds=1, reps=1, log=lambda *_: None)
    assert layers._linear_rows is original  # the bench restores the layer's product
    assert [r["step"] for r in result["rows"]] == list(steps)
    assert all(r["batched_ms"] > 0 and r["rows_ms"] > 0 for r in result["rows"])
    table = linear_layout.format_table(result)
    assert all(f"| {r['step']} |" in table for r in result["rows"])
