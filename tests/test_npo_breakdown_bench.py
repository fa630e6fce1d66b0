"""bench/npo_breakdown.py times parts of one computation: check they are that computation at the tiny size."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bench import models, npo_breakdown
from vleraser_jax.checkpoints import load_pretrained


@pytest.mark.slow  # ~30 s of compiles
def test_parts_compute_the_same_loss_and_the_table_lists_every_part(tmp_path, capsys):
    size = models.SIZES["tiny"]
    models.build_checkpoint(size, tmp_path / "ckpt")
    model, params, _ = load_pretrained(tmp_path / "ckpt")
    parts = npo_breakdown._parts(model, params, size)
    run = {name: jax.jit(fn)(*args) for name, (fn, args) in parts.items()}
    plain = float(run["forward, no LoRA"])
    value, grads = run["backward for activations only (no LoRA)"]
    assert float(value) == plain and all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    # the baselines' LoRA starts at b = 0 (PEFT): GA's loss is minus the plain next-token loss
    ga_value, ga_grads = run["GA value_and_grad (LoRA)"]
    np.testing.assert_allclose(float(ga_value), -plain, rtol=1e-6)
    assert any(float(np.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(ga_grads))
    assert npo_breakdown.main(["--size", "tiny", "--rounds", "1"]) == 0
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in parts)
