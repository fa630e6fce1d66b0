"""A tiny training problem with fault injection, shared by test_reliability.py and the child process it kills.

Run as a script (`python reliability_helpers.py CKPT_DIR KILL_STEP TOTAL SAVE_EVERY ACCUM`) it trains with
checkpoints and SIGKILLs itself just before step KILL_STEP: no Python cleanup, no final save.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py, so parent and child agree

from vleraser_jax.unlearn import trainer as tr  # noqa: E402


class Killed(BaseException):
    """The process "dies" here: not an Exception, so nothing on the way out can handle it."""


@jax.custom_vjp
def grad_gate(x, scale):
    """Identity forward; the backward pass multiplies the gradient by `scale` (a gradient-only fault)."""
    return x


grad_gate.defvjp(lambda x, scale: (x, scale), lambda scale, g: (g * scale, jnp.zeros_like(scale)))

FAULTS = {"nan_loss": ("loss", np.nan), "inf_loss": ("loss", np.inf),
          "nan_grad": ("grad", np.nan), "inf_grad": ("grad", np.inf)}

CFG = tr.TrainConfig(total_steps=24, learning_rate=0.1, warmup_steps=2, log_every=5, progress=False)


def problem(fault: str | None = None, fault_step: int | None = None, kill_step: int | None = None,
            hard_kill: bool = False):
    """(loss_fn, trainable, frozen, batch_fn) of a linear regression; batches are a pure function of the step.

    fault: a key of FAULTS, injected from `fault_step` on (the loss or only the gradient turns NaN/Inf).
    kill_step: batch_fn "dies" when asked for that step: raises Killed, or SIGKILLs the process.
    """
    rng = np.random.default_rng(0)
    w_true = rng.standard_normal((5, 3)).astype(np.float32)
    x = rng.standard_normal((64, 5)).astype(np.float32)
    y = x @ w_true

    def batch_fn(step):
        if step == kill_step:
            if hard_kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Killed(f"killed before step {step}")
        idx = np.random.default_rng([0, step]).choice(64, size=8, replace=False)
        loss_scale, grad_scale = np.float32(1.0), np.float32(1.0)
        if fault is not None and step >= fault_step:
            where, value = FAULTS[fault]
            if where == "loss":
                loss_scale = np.float32(value)
            else:
                grad_scale = np.float32(value)
        return {"x": x[idx], "y": y[idx], "loss_scale": loss_scale, "grad_scale": grad_scale}

    def loss_fn(frozen, trainable, batch, rng):
        w = grad_gate(trainable["w"], batch["grad_scale"])
        pred = batch["x"] @ w * frozen["scale"] + trainable["b"]
        return jnp.mean((pred - batch["y"]) ** 2) * batch["loss_scale"], {}

    trainable = {"w": jnp.zeros((5, 3)), "b": jnp.zeros((3,))}
    return loss_fn, trainable, {"scale": jnp.asarray(1.0)}, batch_fn


def train_config(checkpoint_dir=None, **changes) -> tr.TrainConfig:
    return dataclasses.replace(CFG, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), **changes)


if __name__ == "__main__":
    ckpt, kill, total, save_every, accum = sys.argv[1], *map(int, sys.argv[2:6])
    loss_fn, trainable, frozen, batch_fn = problem(kill_step=kill, hard_kill=True)
    tr.train(loss_fn, trainable, frozen, batch_fn,
             train_config(ckpt, total_steps=total, save_every=save_every, grad_accum_steps=accum))
    sys.exit(3)  # not reached: the kill comes first
