"""JAX's persistent compilation cache (what every `vleraser` pipeline command turns on, in <work_dir>/xla_cache),
measured: the same method run with the cache off, over an empty cache, and over the cache a previous process filled,
side by side in one invocation.

    python -m bench.compile_cache --config configs/tiny_llava.py --methods ga npo vl_eraser --rounds 2 \
        --json bench/compile_cache.json --markdown bench/COMPILE_CACHE.md

Every method run builds its own jitted steps (new closures, the same XLA programs), so without the cache a sweep
recompiles them for every trial and the demo for every attack. Each round runs, per method and in fresh processes,
`off` (JAX_ENABLE_COMPILATION_CACHE=false), `empty` (a new cache directory) and `filled` (a new process over the
directory `empty` filled); each process runs the method twice, as a sweep runs its trials one after another. The
table gives medians over rounds and the ratios off / cache for the second run in a process (a sweep trial, a
relearning attack) and for the first run of a new process (a rerun of the demo or of a sweep). Unlearning only,
no evaluation; the stages are the config's (trained first when not cached: pass `--config.base.steps=1` etc. for
a quick look on untrained weights, where VL-Eraser's vacuum ranks differ from a trained model's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cost_passes import _median

MODES = ("off", "empty", "filled")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
RESULT = "COMPILE_CACHE_RESULT "


def child(config: str, overrides: list[str], method: str, repeats: int) -> dict:
    """Run `method` `repeats` times in this process; wall and XLA compile seconds of each run."""
    import jax
    import jax.monitoring as monitoring

    from bench.cost_passes import load_stages
    from vleraser_jax.config import load_config
    from vleraser_jax.experiment.methods import run_method
    from vleraser_jax.train.workspace import use_compilation_cache

    compile_s = [0.0]
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_s.__setitem__(0, compile_s[0] + secs) if name == COMPILE_EVENT else None)
    c = load_config(config, overrides)
    cache = use_compilation_cache(c)
    model, params, processor, bench = load_stages(c, log=lambda *_: None)
    runs = []
    for _ in range(repeats):
        before, t0 = compile_s[0], time.perf_counter()
        out = run_method(c, method, model, params, processor, bench, log=lambda *_: None)
        jax.block_until_ready(out.params)
        runs.append({"wall_s": time.perf_counter() - t0, "compile_s": compile_s[0] - before})
    return {"method": method, "cache": str(cache) if cache else None, "runs": runs}


def spawn(config: str, overrides: list[str], method: str, repeats: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.compile_cache", "--child", method, "--repeats", str(repeats),
           "--config", config, *overrides]
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{method} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def mode_env(mode: str, cache_dir: Path) -> dict:
    if mode == "off":
        return {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    return {"JAX_ENABLE_COMPILATION_CACHE": "true", "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}


def summarize(records: list[dict]) -> list[dict]:
    """One row per method: median first/second-run wall and compile seconds per mode, and the two ratios."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        row = {"method": method, "rounds": len({r["round"] for r in mine})}
        for mode in MODES:
            for k, name in enumerate(("first", "second")):
                runs = [r["runs"][k] for r in mine if r["mode"] == mode and len(r["runs"]) > k]
                row[f"{mode}_{name}_s"] = _median([x["wall_s"] for x in runs])
                row[f"{mode}_{name}_compile_s"] = _median([x["compile_s"] for x in runs])
        by_round = {(r["round"], r["mode"]): r["runs"] for r in mine}
        rounds = sorted({r["round"] for r in mine})

        def paired(mode: str, run: int) -> float:
            """Median over rounds of off's wall time over `mode`'s, for the `run`-th run of a process."""
            return _median([by_round[k, "off"][run]["wall_s"] / by_round[k, mode][run]["wall_s"]
                            for k in rounds if (k, "off") in by_round and (k, mode) in by_round])

        row["ratio_repeat"], row["ratio_new_process"] = paired("empty", 1), paired("filled", 0)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["Wall seconds of a method run (XLA compile seconds in brackets), medians over rounds; × = off / cache.", "",
             "| method | off: 1st run | off: 2nd run | empty cache: 1st | empty cache: 2nd | filled cache: 1st "
             "| × 2nd run in a process | × 1st run of a new process |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda mode, k: f"{r[f'{mode}_{k}_s']:.1f} ({r[f'{mode}_{k}_compile_s']:.1f})"  # noqa: E731
        lines.append(f"| {r['method']} | {cell('off', 'first')} | {cell('off', 'second')} | {cell('empty', 'first')} | "
                     f"{cell('empty', 'second')} | {cell('filled', 'first')} | {r['ratio_repeat']:.2f} | "
                     f"{r['ratio_new_process']:.2f} |")
    return "\n".join(lines)


def run(config: str, overrides: list[str], methods: list[str], rounds: int, log=print) -> dict:
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    log(f"compile-cache bench: {len(methods)} methods × {len(MODES)} modes × {rounds} rounds, each a fresh process "
        "running the method twice (stages trained first if missing)")
    spawn(config, overrides, methods[0], 0, mode_env("off", Path()))  # trains / loads the stages, untimed
    records = []
    with tempfile.TemporaryDirectory(prefix="xla-cache-bench-") as tmp:
        for k in range(rounds):
            for method in methods:
                cache_dir = Path(tmp) / f"round{k}-{method}"
                for mode in MODES:
                    out = spawn(config, overrides, method, 2, mode_env(mode, cache_dir))
                    records.append({"round": k, "mode": mode, **out})
                    log(f"round {k + 1}/{rounds} {method} {mode}: " + ", ".join(
                        f"{x['wall_s']:.1f} s ({x['compile_s']:.1f} compiling)" for x in out["runs"]))
    return {"config": config, "overrides": overrides, "rounds": rounds, "records": records, "rows": summarize(records)}


def main(argv=None) -> int:
    from vleraser_jax.io import write_text_atomic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny_llava.py")
    p.add_argument("--methods", nargs="+", default=["ga", "npo", "vl_eraser"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=2, help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    if args.child:
        print(RESULT + json.dumps(child(args.config, overrides, args.child, args.repeats)), flush=True)
        return 0
    out = run(args.config, overrides, args.methods, args.rounds)
    table = format_table(out["rows"])
    print(table)
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=1))
    if args.markdown:
        write_text_atomic(args.markdown, f"# Persistent compilation cache ({Path(args.config).stem})\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
