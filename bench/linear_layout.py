"""Why `models.layers.Dense` multiplies a [rows, in] matrix, measured: the demo's training steps with the kernel
applied to the batched activations directly (`einsum("...i,io->...o")`, what the layer did before) and to them
flattened to rows first (what it does now), side by side in one invocation, interleaved over rounds.

    python -m bench.linear_layout --config configs/tiny_llava.py --rounds 3 --reps 8 --json bench/linear_layout.json

The two forms are the same matrix product; what differs is the weight gradient autodiff derives. From the batched
form it contracts the batch and position axes of activation and cotangent together, which XLA:CPU (jax 0.10)
runs as a slow library fusion behind a transpose copy; from the rows form it is a plain [rows, in]ᵀ [rows, out]
dot. Steps: the full fine-tune step the base / oracle / vanilla stages run (every parameter trains), one per
batch shape of the config's base-stage schedule, and the LoRA step (rank 8 on every LM linear, frozen base) that
the reverse-training baselines run. Weights are the config's random init (speed does not depend on them). Each
round times every (step, form) pair once (median of `--reps` calls after a warm-up), so background load hits all
of them; the table gives medians over rounds and the median of the per-round ratios (min–max).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

FORMS = ("batched", "rows")


def batched_linear(x, kernel):
    """The layer's former product: the kernel on the batched activations."""
    return jnp.einsum("...i,io->...o", x, kernel)


def _steps(c):
    """({name: (loss_fn, trainable, frozen, batch)} of every measured step of config `c`, the optimizer)."""
    from transformers import AutoTokenizer

    from vleraser_jax.checkpoints import architecture_for
    from vleraser_jax.data.batching import BatchSchedule
    from vleraser_jax.processing import load_processor
    from vleraser_jax.train.recipes import training_sources
    from vleraser_jax.train.tiny_models import init_from_scratch, model_config
    from vleraser_jax.train.workspace import prepare_data, processor_dir
    from vleraser_jax.unlearn import lora as lora_lib
    from vleraser_jax.unlearn import trainer as tr
    from vleraser_jax.unlearn.adapter import full_training_state, lm_loss_fn, lora_training_state

    root, tok = prepare_data(c, log=lambda *_: None)
    config = model_config(c, AutoTokenizer.from_pretrained(str(tok), local_files_only=True))
    processor = load_processor(processor_dir(config, tok, Path(c.work_dir) / "bench-linear-layout.processor"))
    model = architecture_for(config.model_type).model_cls(config)
    params = init_from_scratch(model, c.seed)
    sc = c.base
    schedule = BatchSchedule(training_sources(c, "base", root, processor), sc.batch_size, sc.steps, c.seed,
                             length_buckets=sc.get("length_buckets", 1))
    first = {}
    for step in range(sc.steps):
        first.setdefault(int(schedule.pool_of_step[step]), step)
    batches = {}
    for pool, step in sorted(first.items()):
        _, _, has_image, length = schedule.pools[pool]
        batches.setdefault(f"{'image' if has_image else 'text'} rows x{length}", schedule(step))
    tx = tr.make_optimizer(tr.TrainConfig(total_steps=sc.steps, learning_rate=sc.learning_rate,
                                          lr_multipliers=tuple(sc.lr_multipliers)))
    full_trainable, full_frozen = full_training_state(params, ".*")
    full_loss = lm_loss_fn(model, "token")
    out = {f"full fine-tune, {name}": (full_loss, full_trainable, full_frozen, batch) for name, batch in batches.items()}
    lora = lora_lib.init(params, 8, 16.0, jax.random.PRNGKey(0), pattern=lora_lib.LM_LINEARS)
    lora_trainable, lora_frozen = lora_training_state(params, lora)
    text = next(b for name, b in batches.items() if name.startswith("text"))
    out["LoRA r8 on every LM linear, text rows"] = (lm_loss_fn(model, "token", lora=True), lora_trainable,
                                                    lora_frozen, text)
    return out, tx


def time_step(loss_fn, trainable, frozen, batch, tx, reps: int) -> float:
    """Median ms of one jitted train step (compiled and warmed first)."""
    from vleraser_jax.unlearn import trainer as tr

    step = tr.make_train_step(loss_fn, tx)
    state = tr.init_state(trainable, tx, 0)
    state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(c, rounds: int, reps: int, log=print) -> dict:
    from vleraser_jax.models import layers

    steps, tx = _steps(c)
    rows_linear = layers._linear_rows
    forms = {"batched": batched_linear, "rows": rows_linear}
    times = {(name, form): [] for name in steps for form in FORMS}
    log(f"timing {len(steps)} steps x {len(FORMS)} forms, {rounds} rounds of {reps} calls each")
    try:
        for r in range(rounds):
            for name, (loss_fn, trainable, frozen, batch) in steps.items():
                for form in FORMS:
                    layers._linear_rows = forms[form]  # read when the step is traced
                    times[name, form].append(time_step(loss_fn, trainable, frozen, batch, tx, reps))
            log(f"round {r + 1}/{rounds} done")
    finally:
        layers._linear_rows = rows_linear
    rows = []
    for name in steps:
        ratios = [b / w for b, w in zip(times[name, "batched"], times[name, "rows"])]
        rows.append({"step": name, **{f"{form}_ms": statistics.median(times[name, form]) for form in FORMS},
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return {"config": c.name, "rounds": rounds, "reps": reps, "device": str(jax.devices()[0]),
            "cpu_count": len(jax.devices("cpu")), "rows": rows}


def format_table(result: dict) -> str:
    lines = ["| step | batched product (ms) | rows product (ms) | batched / rows (min–max) |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['step']} | {r['batched_ms']:.1f} | {r['rows_ms']:.1f} | "
                     f"{r['ratio']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.cli import bench_main

    return bench_main(argv, __doc__.splitlines()[0], run, format_table, rounds=5, reps=10)


if __name__ == "__main__":
    raise SystemExit(main())
