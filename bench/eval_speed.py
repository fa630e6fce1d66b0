"""What the evaluation's two shape choices cost, measured on the demo's trained vanilla model, side by side in one
invocation, interleaved over rounds:

    python -m bench.eval_speed --config configs/tiny_llava.py --rounds 3 --json bench/eval_speed.json

- `prefill`: the forward over a batch of evaluation prompts, with the vocabulary product at every position
  (`logits_to_keep=0`, what the generation and option-likelihood prefills did before) and at the last one only
  (`logits_to_keep=1`, what they do now: only the last position picks the first answer token). One batch per
  prompt shape of the evaluation; the last position's logits must agree.
- `answers`: greedy answers to every prompt of the demo's evaluation (`generate_answers`) with prompt lengths
  rounded up to 32 (the former `EvalConfig.length_bucket`) and to 16 (the current one). Both must give the same
  answers; the first pass of each is reported apart (it compiles).

The model, benchmark and evaluation settings are the config's (`eval.max_people` 30, as `vleraser demo` sets it):
the stages are read from `<work_dir>/models` when `make demo` trained them there, trained otherwise.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

BUCKETS = (32, 16)


def _experiment(c):
    from vleraser_jax.experiment.pipeline import open_experiment, run_stages

    vanilla_dir, oracle_dir = run_stages(c, log=lambda *_: None)
    return open_experiment(c, vanilla_dir, oracle_dir, log=lambda *_: None)


def prefill_batches(exp, requests) -> dict:
    """{shape name: one batch of that shape} of the evaluation's prompts, at the current length bucket."""
    from vleraser_jax.eval import evaluate as ev

    out = {}
    for _, batch in ev._padded_batches(requests, [r.prompt.text for r in requests], exp.processor, exp.ecfg):
        name = f"{'image' if 'pixel_values' in batch else 'text'} prompts x{batch['input_ids'].shape[1]}"
        out.setdefault(name, batch)
    return out


def _prefill_fn(model, keep: int):
    def fn(params, batch):
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        return model.apply({"params": params}, **inputs, logits_to_keep=keep).logits[:, -1]
    return jax.jit(fn)


def time_prefill(fn, params, batch, reps: int) -> tuple[float, np.ndarray]:
    """(median ms after a warm-up call, the last position's logits)."""
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    logits = jax.block_until_ready(fn(params, batch))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, batch))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, np.asarray(logits)


def time_answers(exp, requests, bucket: int) -> tuple[float, list[str]]:
    from vleraser_jax.eval.evaluate import generate_answers

    cfg = dataclasses.replace(exp.ecfg, length_bucket=bucket)
    t0 = time.perf_counter()
    answers = generate_answers(exp.model, exp.vanilla, exp.processor, requests, cfg, desc=f"bucket {bucket}")
    return time.perf_counter() - t0, answers


def run(c, rounds: int, reps: int, log=print) -> dict:
    from vleraser_jax.data.protocol import Prompter
    from vleraser_jax.eval.evaluate import build_requests

    exp = _experiment(c)
    requests = build_requests(exp.bench, Prompter.for_processor(exp.processor), exp.ecfg)
    batches = prefill_batches(exp, requests)
    fns = {keep: _prefill_fn(exp.model, keep) for keep in (0, 1)}
    log(f"timing the prefill of {len(batches)} prompt shapes x 2 and greedy answers to {len(requests)} prompts x "
        f"{len(BUCKETS)} buckets, {rounds} rounds")
    prefill = {(name, keep): [] for name in batches for keep in fns}
    largest_gap = 0.0
    first_pass, answer_times, answers = {}, {b: [] for b in BUCKETS}, {}
    for r in range(rounds):
        for name, batch in batches.items():
            last = {}
            for keep, fn in fns.items():
                ms, last[keep] = time_prefill(fn, exp.vanilla, batch, reps)
                prefill[name, keep].append(ms)
            largest_gap = max(largest_gap, float(np.abs(last[0] - last[1]).max() / np.abs(last[0]).max()))
        for bucket in BUCKETS:
            if bucket not in first_pass:  # compiles its shapes: reported apart
                first_pass[bucket], answers[bucket] = time_answers(exp, requests, bucket)
            seconds, again = time_answers(exp, requests, bucket)
            if again != answers[bucket]:
                raise AssertionError(f"bucket {bucket}: two passes gave different answers")
            answer_times[bucket].append(seconds)
        log(f"round {r + 1}/{rounds} done")
    same = sum(a == b for a, b in zip(answers[BUCKETS[0]], answers[BUCKETS[1]]))
    rows = []
    for name in batches:
        ratios = [a / b for a, b in zip(prefill[name, 0], prefill[name, 1])]
        rows.append({"what": f"prefill, {name}", "before": statistics.median(prefill[name, 0]),
                     "after": statistics.median(prefill[name, 1]), "unit": "ms", "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)})
    ratios = [a / b for a, b in zip(answer_times[BUCKETS[0]], answer_times[BUCKETS[1]])]
    rows.append({"what": f"greedy answers to {len(requests)} prompts, length bucket 32 -> 16",
                 "before": statistics.median(answer_times[BUCKETS[0]]),
                 "after": statistics.median(answer_times[BUCKETS[1]]), "unit": "s",
                 "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return {"config": c.name, "rounds": rounds, "reps": reps, "device": str(jax.devices()[0]), "rows": rows,
            "first_pass_s": {str(b): first_pass[b] for b in BUCKETS}, "prompts": len(requests),
            "same_answers": same, "last_logits_max_rel_gap": largest_gap}


def format_table(result: dict) -> str:
    lines = ["| what | before | after | before / after (min–max) |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['what']} | {r['before']:.1f} {r['unit']} | {r['after']:.1f} {r['unit']} | "
                     f"{r['ratio']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |")
    first = result["first_pass_s"]
    lines.append(f"\nFirst pass (compiling): bucket 32 {first['32']:.1f} s, bucket 16 {first['16']:.1f} s. "
                 f"Same answers: {result['same_answers']} of {result['prompts']}. Last-position logits, largest "
                 f"relative gap: {result['last_logits_max_rel_gap']:.1e}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.cli import bench_main
    from vleraser_jax.cli import pipeline_config

    return bench_main(argv, __doc__.splitlines()[0], run, format_table, rounds=3, reps=8, load=pipeline_config,
                      overrides=["--config.eval.max_people=30"])


if __name__ == "__main__":
    raise SystemExit(main())
