"""Which steps see a forget batch, a retain batch or both (`step_plan`), and the batch function that follows a
plan (`PairedSchedule`)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .config import ORDERS


# ------------------------------------------------------------------ schedules


def batches_per_epoch(rows: int, batch_size: int) -> int:
    """A DataLoader's len without drop_last."""
    return -(-rows // batch_size)


def step_plan(order: str, n_forget: int, n_retain: int = 0, *, epochs: float | None = 1.0,
              steps: int | None = None) -> np.ndarray:
    """[S, 2] ints: per step, the index of its forget batch and of its retain batch (−1: none), each a
    running count of that stream's batches. n_forget / n_retain: batches per epoch.

    One epoch's template, by `order`:
      "forget":      F × n_f                                       (GA, NPO)
      "sequential":  F × n_f, then R × n_r                         (MLLMU-Bench GD and KL: a forget pass,
                                                                   then a retain pass, separate steps)
      "interleaved": for it in range(n_r): F first if it % k == 0 (at most n_f of them); then R,
                     k = max(n_r // n_f, 1)                        (MMUnlearner's loop; n_r = n_f alternates)
      "paired":      FR × n_f                                      (one combined loss per step)
    epochs: repeat the template (a fraction truncates it); steps (when epochs is None): cycle it to exactly
    that many steps.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if n_forget < 1:
        raise ValueError("the plan needs at least one forget batch")
    if order in ("sequential", "interleaved", "paired") and n_retain < 1:
        raise ValueError(f"order {order!r} needs retain batches")
    if order == "forget":
        template = ["F"] * n_forget
    elif order == "sequential":
        template = ["F"] * n_forget + ["R"] * n_retain
    elif order == "paired":
        template = ["FR"] * n_forget
    else:
        every, used, template = max(n_retain // n_forget, 1), 0, []
        for it in range(n_retain):
            if it % every == 0 and used < n_forget:
                template.append("F")
                used += 1
            template.append("R")
    if epochs is not None:
        total = max(int(round(epochs * len(template))), 1)
    elif steps is not None and steps > 0:
        total = steps
    else:
        raise ValueError("give epochs, or steps > 0")
    kinds = [template[i % len(template)] for i in range(total)]
    plan = np.full((total, 2), -1, np.int64)
    f = r = 0
    for i, kind in enumerate(kinds):
        if "F" in kind:
            plan[i, 0], f = f, f + 1
        if "R" in kind:
            plan[i, 1], r = r, r + 1
    return plan


class PairedSchedule:
    """`batch(step)` -> {"forget": forget(i)} / {"retain": retain(j)} / both, by `plan` (`step_plan`);
    forget/retain are pure functions of their own batch count (e.g. `data.batching.BatchSchedule`s)."""

    def __init__(self, plan: np.ndarray, forget: Callable[[int], dict] | None, retain: Callable[[int], dict] | None):
        self.plan = np.asarray(plan)
        if (self.plan[:, 0] >= 0).any() and forget is None:
            raise ValueError("the plan has forget steps but no forget batches")
        if (self.plan[:, 1] >= 0).any() and retain is None:
            raise ValueError("the plan has retain steps but no retain batches")
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def forget_steps(self) -> int:
        return int((self.plan[:, 0] >= 0).sum())

    @property
    def retain_steps(self) -> int:
        return int((self.plan[:, 1] >= 0).sum())

    def __call__(self, step: int) -> dict:
        f, r = (int(x) for x in self.plan[step])
        out = {}
        if f >= 0:
            out["forget"] = self.forget(f)
        if r >= 0:
            out["retain"] = self.retain(r)
        return out
