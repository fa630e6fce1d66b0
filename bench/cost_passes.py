"""What each unlearning method costs, at its chosen setting and at the same number of passes over D_f, side by side
in one run, as ratios to NPO (the paper quotes VL-Eraser ≈ 1.03× NPO).

    python -m bench.cost_passes --config configs/tiny_llava.py --passes 1 --rounds 3 --json bench/cost_passes.json

A "pass over D_f" is one look at every forget row: a baseline's `epochs` (GD and KL pair each forget batch with a
retain batch, MMUnlearner interleaves its forget steps with retain steps, so one epoch still reads D_f once);
VL-Eraser's stage-1 `steps × batch_size / |D_f|`. Fixed costs stay in: VL-Eraser's vacuum statistics (one pass over
the retain keys) and MMUnlearner's Fisher mask are paid at any number of passes. Each round runs every
(method, setting) once, interleaved, so load changes hit every method; each ratio is that round's wall time over
NPO's at the same setting kind, and the table gives medians (min–max). Round 1 includes XLA compilation (as a
user's first run does); the warm columns are rounds 2+. Evaluation is not timed: this is the unlearning alone.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

REFERENCE = "npo"
DEFAULT_METHODS = ("vl_eraser", "vl_eraser_paper", "ga", "gd", "kl", "npo", "mmunlearner")
# a method's info keys (…_seconds) by what the time was spent on
SHARES = {"statistics": ("vacuum_seconds", "mask_seconds", "data_seconds"),
          "training": ("distill_seconds", "train_seconds"),
          "deletion": ("delete_seconds", "merge_seconds")}


def passes_of(c, method: str, forget_rows: int, retain_rows: int = 0) -> float:
    """Passes over D_f the config's setting of `method` makes (a baseline counted in steps: its forget steps over
    D_f's batches per epoch; retain_rows matters only to MMUnlearner's interleaving)."""
    from vleraser_jax.experiment.methods import METHODS, baseline_method_config, method_config
    from vleraser_jax.unlearn.baselines import batches_per_epoch, run_plan

    if method in METHODS:
        _, _, run = method_config(c, method)
        return run.steps * run.batch_size / forget_rows
    _, settings, run = baseline_method_config(c, method)
    if settings.epochs is not None:
        return float(settings.epochs)
    forget_steps = int((run_plan(settings, run, forget_rows, retain_rows)[:, 0] >= 0).sum())
    return forget_steps / batches_per_epoch(forget_rows, run.batch_size)


def setting_for_passes(c, method: str, passes: float, forget_rows: int) -> dict:
    """The setting change that makes `method` read D_f `passes` times."""
    from vleraser_jax.experiment.methods import METHODS, method_config

    if passes <= 0:
        raise ValueError(f"--passes must be > 0, got {passes}")
    if method in METHODS:
        _, _, run = method_config(c, method)
        return {"steps": max(1, math.ceil(passes * forget_rows / run.batch_size))}
    return {"epochs": float(passes)}


def shares(info: dict) -> dict[str, float]:
    """Seconds per kind of work (statistics / training / deletion) from a method's info."""
    return {kind: sum(float(info.get(k, 0.0)) for k in keys) for kind, keys in SHARES.items()}


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def summarize(records: list[dict], reference: str = REFERENCE) -> list[dict]:
    """One row per (method, kind): passes, cold and warm wall medians, ratio to the reference in the same round
    (median, min, max over the rounds) and the median share of each kind of work."""
    by_round = {(r["round"], r["kind"], r["method"]): r for r in records}
    rows = []
    for kind in ("chosen", "equal"):
        for method in dict.fromkeys(r["method"] for r in records):
            mine = sorted((r for r in records if r["method"] == method and r["kind"] == kind), key=lambda r: r["round"])
            if not mine:
                continue
            ratios = []
            for r in mine:
                ref = by_round.get((r["round"], kind, reference))
                if ref and ref["wall_s"] > 0:
                    ratios.append(r["wall_s"] / ref["wall_s"])
            warm = [r["wall_s"] for r in mine if r["round"] > 0]
            total = {k: _median([r["shares"][k] for r in mine]) for k in SHARES}
            spent = sum(total.values()) or 1.0
            rows.append({"method": method, "kind": kind, "passes": mine[0]["passes"], "setting": mine[0]["setting"],
                         "cold_s": mine[0]["wall_s"], "warm_s": _median(warm), "rounds": len(mine),
                         "ratio": _median(ratios), "ratio_min": min(ratios, default=float("nan")),
                         "ratio_max": max(ratios, default=float("nan")),
                         **{f"share_{k}": v / spent for k, v in total.items()}})
    return rows


def format_table(rows: list[dict], forget_rows: int, forget_people: int, reference: str = REFERENCE) -> str:
    lines = [f"D_f: {forget_rows} rows of {forget_people} forget people. Ratio: wall time / {reference.upper()}'s "
             "at the same setting kind in the same round, median (min–max) over rounds.", "",
             "| setting | method | passes over D_f | cold s | warm s | × NPO | statistics | training | deletion |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "chosen" if r["kind"] == "chosen" else "equal passes"
        warm = "–" if math.isnan(r["warm_s"]) else f"{r['warm_s']:.1f}"
        ratio = "–" if math.isnan(r["ratio"]) else f"{r['ratio']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
        lines.append(f"| {name} | {r['method']} | {r['passes']:.2f} | {r['cold_s']:.1f} | {warm} | {ratio} | "
                     f"{r['share_statistics']:.0%} | {r['share_training']:.0%} | {r['share_deletion']:.0%} |")
    return "\n".join(lines)


def load_stages(c, log):
    """The vanilla model, processor and benchmark of the config (stages trained first when not cached)."""
    from vleraser_jax.data import mllmu
    from vleraser_jax.experiment.pipeline import load_vanilla, run_stages
    from vleraser_jax.processing import load_processor
    from vleraser_jax.train.workspace import data_root

    vanilla_dir, _ = run_stages(c, log)
    model, params, _ = load_vanilla(c, vanilla_dir)
    return model, params, load_processor(vanilla_dir), mllmu.load_benchmark(data_root(c), c.data.forget_ratio)


def run(c, methods, passes: float, rounds: int, log=print) -> dict:
    from vleraser_jax.experiment.methods import run_method, with_method_settings

    if REFERENCE not in methods:
        raise ValueError(f"the ratios need {REFERENCE} among the methods")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    model, params, processor, bench = load_stages(c, log)
    forget_rows, retain_rows = len(bench.forget_train), len(bench.retain_train)
    plan = []
    for method in methods:
        plan.append((method, "chosen", {}, passes_of(c, method, forget_rows, retain_rows)))
        equal = setting_for_passes(c, method, passes, forget_rows)
        plan.append((method, "equal", equal, passes_of(with_method_settings(c, method, equal), method, forget_rows,
                                                       retain_rows)))
    log(f"cost bench: {len(plan)} runs × {rounds} rounds ({', '.join(methods)}; chosen settings and {passes:g} "
        f"pass(es) over the {forget_rows} forget rows); unlearning only, no evaluation")
    records = []
    for k in range(rounds):
        for n, (method, kind, setting, method_passes) in enumerate(plan):
            t0 = time.perf_counter()
            out = run_method(with_method_settings(c, method, setting) if setting else c, method, model, params,
                             processor, bench, log=lambda *_: None)
            wall = time.perf_counter() - t0
            records.append({"round": k, "method": method, "kind": kind, "setting": setting, "passes": method_passes,
                            "wall_s": wall, "shares": shares(out.info)})
            log(f"round {k + 1}/{rounds}, run {n + 1}/{len(plan)}: {method} ({kind}, {method_passes:.2f} passes) "
                f"{wall:.1f} s")
    return {"config": c.name, "forget_ratio": c.data.forget_ratio, "forget_rows": forget_rows,
            "forget_people": len(bench.forget), "passes": passes, "rounds": rounds, "machine": platform.processor()
            or platform.machine(), "records": records, "rows": summarize(records)}


def main(argv=None) -> int:
    from vleraser_jax.config import load_config
    from vleraser_jax.io import write_text_atomic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny_llava.py")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--passes", type=float, default=1.0, help="passes over D_f for the equal-pass rows")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="write every record and the summary here")
    p.add_argument("--markdown", default=None, help="write the table here")
    args, overrides = p.parse_known_args(argv)
    c = load_config(args.config, overrides)
    out = run(c, args.methods, args.passes, args.rounds)
    table = format_table(out["rows"], out["forget_rows"], out["forget_people"])
    print(table)
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=1))
    if args.markdown:
        write_text_atomic(args.markdown, f"# Unlearning cost at equal passes over D_f ({c.name}, forget "
                                       f"{c.data.forget_ratio}%)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
