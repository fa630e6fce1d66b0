"""What a run will do, said before it starts (with a time estimate), and where its time went, said at the end."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Sequence

from ..train.workspace import STAGES, oracle_enabled, stage_dir

# Seconds per training step of the tiny configs (batch 16, 2 CPU cores), and per evaluated model / method run /
# method's diagnostics, from the fresh-clone demo of 2026-12-04 (1737 s: base 447, oracle 403, vanilla 163 s; the
# references' evaluations 83 s; the ten methods 638 s on 2 workers) on a machine whose XLA dense-matmul peak was
# 183 GFLOP/s. On the 2026-12-03 machine (peak 401) the previous, slower code took 1345 s, so there the estimate
# errs long. Only the up-front estimate uses them.
SECONDS_PER_STEP = {"base": 0.149, "oracle": 0.134, "vanilla": 0.136}
SECONDS_PER_EVALUATION = 24.0
SECONDS_PER_METHOD = 30.0
SECONDS_PER_DIAGNOSTICS = 26.0
# How much sooner the methods finish on 2 worker processes than in one: the demo's ten methods took 537 s in one
# process and 432 s on 2 workers (fresh clones of 2026-12-03, on 2 cores).
CONCURRENT_SPEEDUP = 1.24
# The fastest 2-core machine measured: a fresh-clone demo of 2ce8c7f took 1121 s there (2026-12-07, base step
# ~107 ms) where the table above estimates 1618 s. The estimate is said as a range between the two machines.
FAST_MACHINE_FRACTION = 1121 / 1618


def stage_plan(c) -> list[tuple[str, str, int | None]]:
    """[(stage, "reuse" | "train" | "pretrained", steps)] in training order."""
    out = []
    for stage in STAGES:
        if stage == "oracle" and not oracle_enabled(c):
            continue
        if stage == "base" and c.model.get("checkpoint"):
            out.append((stage, "pretrained", None))
            continue
        sc = c.get(stage)
        steps = int(sc.steps) if sc.get("steps") else None
        out.append((stage, "reuse" if (stage_dir(c, stage) / "config.json").exists() else "train", steps))
    return out


def describe_run(c, methods: Sequence[str], diagnostics: dict | None, workers: int = 1) -> str:
    """A few lines: the stages to train or reuse, the methods (on `workers` processes), the evaluation and an
    estimated duration."""
    plan = stage_plan(c)
    estimate = sum(SECONDS_PER_STEP.get(s, 0.3) * (n or 0) for s, what, n in plan if what == "train")
    lines = ["plan:"]
    for stage, what, steps in plan:
        detail = f", {steps} steps" if steps and what == "train" else ""
        lines.append(f"  {stage:<8} {what}{detail}")
    kinds = [k for k, on in (diagnostics or {}).items() if on] if diagnostics is not None else ["all"]
    references = 2 + bool(c.eval.get("base_row", False))
    per_method = SECONDS_PER_METHOD + SECONDS_PER_EVALUATION + (SECONDS_PER_DIAGNOSTICS if kinds else 0.0)
    speedup = CONCURRENT_SPEEDUP if workers > 1 and len(methods) > 1 else 1.0
    estimate += references * SECONDS_PER_EVALUATION + len(methods) * per_method / speedup
    evaluations = references + len(methods)
    at_once = f" ({min(workers, len(methods))} at a time)" if speedup > 1 else ""
    lines.append(f"  methods  {', '.join(methods)}{at_once}")
    lines.append(f"  evaluate {evaluations} models on forget_{c.data.forget_ratio} (at most "
                 f"{c.eval.max_people or 'all'} people per set), diagnostics: {', '.join(kinds) or 'none'}")
    fast = estimate * FAST_MACHINE_FRACTION
    lines.append(f"  estimated {fast / 60:.0f}-{estimate / 60:.0f} min on 2 CPU cores (the fastest and slowest "
                 f"2-core machines measured; stages marked reuse cost nothing)")
    return "\n".join(lines)


class Timings:
    """Wall time per named part, in the order the parts ran; a part's inner parts (e.g. the methods that ran at
    once on worker processes, each with its own wall time) are listed under it and not added to the total."""

    def __init__(self):
        self.parts: dict[str, float] = {}
        self.inner: dict[str, dict[str, float]] = {}

    @contextmanager
    def part(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - t0

    def add_inner(self, parent: str, name: str, seconds: float) -> None:
        inner = self.inner.setdefault(parent, {})
        inner[name] = inner.get(name, 0.0) + seconds

    def table(self) -> str:
        total = sum(self.parts.values())
        width = max([40, *map(len, self.parts)] + [len(n) + 4 for inner in self.inner.values() for n in inner])
        lines = ["time breakdown:"]
        for name, seconds in self.parts.items():
            lines.append(f"  {name:<{width}} {seconds:7.1f} s")
            if name in self.inner:
                lines.append("    of which, overlapping (each part's own wall time):")
                lines += [f"      {inner:<{width - 4}} {s:7.1f} s" for inner, s in self.inner[name].items()]
        return "\n".join(lines + [f"  {'total':<{width}} {total:7.1f} s"])
