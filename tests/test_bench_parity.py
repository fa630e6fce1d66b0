"""The benchmark compares like with like: bench/torch_reference.py computes the same VL-Eraser stage-1 and
NPO steps as the package (loss, then the LoRA after AdamW steps), on the tiny config."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import jax_steps, models  # noqa: E402
from bench import torch_reference as ref  # noqa: E402
from vleraser_jax.checkpoints import load_pretrained  # noqa: E402

STEPS = 2  # the second step also checks the moments and NPO's a-gradient (b = 0 at step 0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    size = models.SIZES["tiny"]
    path = tmp_path_factory.mktemp("bench_tiny")
    torch_model = models.build_checkpoint(size, path)
    model, params, _ = load_pretrained(path)
    return size, torch_model, model, params


def _batches(size):
    return [models.make_batch(size, seed=s, pad_last=5) for s in range(STEPS)]


def _torch_step(torch_model, lora, loss):
    return ref.Step(lora, loss, jax_steps.LR, jax_steps.WEIGHT_DECAY, max_grad_norm=jax_steps.MAX_GRAD_NORM)


def _compare(jax_losses, torch_losses, jax_state, torch_step):
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    got = jax_steps.trainable_by_module(jax_state)
    want = torch_step.trainable()
    assert got.keys() == want.keys()
    for module in want:
        for k in ("a", "b"):
            # after 2 AdamW steps of lr 1e-3 the LoRA moved by ~2e-3; agreement to 1e-6 absolute is ~0.05% of it
            np.testing.assert_allclose(got[module][k], want[module][k], rtol=0, atol=1e-6, err_msg=f"{module}/{k}")


def test_vl_eraser_step_matches_torch(pair):
    size, torch_model, model, params = pair
    step, state, frozen, lora, projectors = jax_steps.vl_eraser(model, params, size)
    tlora = ref.TorchLoRA(torch_model, jax.device_get(lora), jax.device_get(projectors))
    try:
        tstep = _torch_step(torch_model, tlora, lambda l, b: ref.vl_eraser_loss(l, b, 0.5))
        jl, tl = [], []
        for batch in _batches(size):
            state, metrics = step(state, frozen, batch)
            jl.append(float(metrics["loss"]))
            tl.append(float(tstep(ref.to_torch(batch))))
        assert 0.1 < jl[0] < 10
        _compare(jl, tl, state, tstep)
    finally:
        tlora.remove()


def test_npo_step_matches_torch(pair):
    size, torch_model, model, params = pair
    step, state, frozen, lora = jax_steps.npo(model, params, size)
    tlora = ref.TorchLoRA(torch_model, jax.device_get(lora), capture=None)
    try:
        tstep = _torch_step(torch_model, tlora, lambda l, b: ref.npo_loss(l, b, jax_steps.NPO_BETA))
        jl, tl = [], []
        for batch in _batches(size):
            state, metrics = step(state, frozen, {"forget": batch})
            jl.append(float(metrics["loss"]))
            tl.append(float(tstep(ref.to_torch(batch))))
        assert jl[0] == pytest.approx(2.0 / jax_steps.NPO_BETA * np.log(2.0), rel=1e-6)  # θ = ref at step 0
        assert jl[1] != pytest.approx(jl[0], rel=1e-6)
        _compare(jl, tl, state, tstep)
    finally:
        tlora.remove()
