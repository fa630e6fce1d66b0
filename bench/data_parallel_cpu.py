"""Data parallelism over host CPU devices, measured: the same training stage on one XLA CPU device and on N
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, the config's `mesh.data=-1` fills them), side by side in
one invocation, interleaved over rounds.

    python -m bench.data_parallel_cpu --config configs/tiny_llava.py --stage base --steps 400 --rounds 2 \
        --devices 1 2 --json bench/data_parallel_cpu.json

XLA:CPU already spreads one device's work over the cores (intra-op threads), so this asks whether splitting the
batch over N devices uses them better. Each run is a fresh process with its own work directory (the synthetic
benchmark, a cold compilation cache, no checkpoints), training `--steps` steps of `--stage` from scratch (the base
stage needs nothing else). Throughput: the median of the trainer's logged examples/s after the first quarter of
the steps (compilation and warm-up excluded); the ratio pairs runs of the same round. The loss curves of the two
layouts are compared too: the same batches, so only the reduction order of the gradient differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.cost_passes import _median


def train_once(config: str, overrides: list[str], stage: str, steps: int, devices: int, work_dir: Path) -> dict:
    """Train `stage` for `steps` steps in a fresh process on `devices` host devices; its logged records."""
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
    cmd = [sys.executable, "-m", "vleraser_jax.cli", "train", "--config", config, "--stage", stage,
           f"--config.{stage}.steps={steps}", f"--config.{stage}.save_every=0", f"--config.work_dir={work_dir}",
           *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    logs = sorted((work_dir / "models").glob(f"*-{stage}-*.train.jsonl"))
    if done.returncode != 0 or not logs:
        raise RuntimeError(f"{stage} on {devices} device(s) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"devices": devices, "records": [json.loads(line) for line in logs[-1].read_text().splitlines()]}


def throughput(records: list[dict], steps: int) -> float:
    """Median examples/s over the records after the first quarter of the steps."""
    late = [r["examples_per_s"] for r in records if r["step"] > steps // 4]
    if not late:
        raise ValueError(f"no logged step after {steps // 4} of {steps}")
    return _median(late)


def summarize(runs: list[dict], steps: int) -> list[dict]:
    """One row per device count: median throughput, its ratio to one device's in the same round (median, min, max),
    and the largest loss difference from the one-device run of the same round."""
    base = {r["round"]: r for r in runs if r["devices"] == 1}
    rows = []
    for devices in sorted({r["devices"] for r in runs}):
        mine = [r for r in runs if r["devices"] == devices]
        ratios = [throughput(r["records"], steps) / throughput(base[r["round"]]["records"], steps)
                  for r in mine if r["round"] in base]
        loss_gap = max((abs(a["loss"] - b["loss"]) for r in mine if r["round"] in base
                        for a, b in zip(r["records"], base[r["round"]]["records"])), default=float("nan"))
        rows.append({"devices": devices, "rounds": len(mine),
                     "examples_per_s": _median([throughput(r["records"], steps) for r in mine]),
                     "ratio": _median(ratios),
                     "ratio_min": min(ratios, default=float("nan")), "ratio_max": max(ratios, default=float("nan")),
                     "max_loss_gap": loss_gap, "final_loss": _median([r["records"][-1]["loss"] for r in mine])})
    return rows


def format_table(rows: list[dict], stage: str, steps: int) -> str:
    lines = [f"{stage} stage, {steps} steps from scratch; examples/s = median after step {steps // 4}; "
             "× = over one device in the same round, median (min–max).", "",
             "| host devices | rounds | examples/s | × one device | largest loss gap vs one device | final loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['rounds']} | {r['examples_per_s']:.1f} | {r['ratio']:.2f} "
                     f"({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {r['max_loss_gap']:.2e} | {r['final_loss']:.4f} |")
    return "\n".join(lines)


def run(config: str, overrides: list[str], stage: str, steps: int, devices: list[int], rounds: int,
        log=print) -> dict:
    if 1 not in devices:
        raise ValueError(f"--devices must include 1 (the reference), got {devices}")
    if rounds < 1 or steps < 8:
        raise ValueError(f"need --rounds >= 1 and --steps >= 8, got {rounds} and {steps}")
    log(f"data-parallel bench: {stage} stage, {steps} steps, host devices {devices}, {rounds} rounds, "
        "each a fresh process")
    runs = []
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as tmp:
        for k in range(rounds):
            for n in devices:
                out = train_once(config, overrides, stage, steps, n, Path(tmp) / f"r{k}-d{n}")
                runs.append({"round": k, **out})
                log(f"round {k + 1}/{rounds}, {n} device(s): {throughput(out['records'], steps):.1f} examples/s, "
                    f"final loss {out['records'][-1]['loss']:.4f}")
    return {"config": config, "overrides": overrides, "stage": stage, "steps": steps, "runs": runs,
            "rows": summarize(runs, steps)}


def main(argv=None) -> int:
    from vleraser_jax.io import write_text_atomic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny_llava.py")
    p.add_argument("--stage", default="base", choices=["base"], help="a stage that trains from scratch")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args(argv)
    out = run(args.config, overrides, args.stage, args.steps, args.devices, args.rounds)
    print(format_table(out["rows"], args.stage, args.steps))
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
