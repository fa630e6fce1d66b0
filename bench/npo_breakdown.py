"""Where JAX's NPO step spends its time, part by part, at one bench size (why it reaches less of XLA's matmul
peak than the stage-1 step, BENCHMARKS.md).

    python -m bench.npo_breakdown --size small --rounds 5

Each part is compiled ahead of time and timed in interleaved rounds (every part once per round, so background
load hits all of them); the table gives median ms, XLA's FLOP count and GFLOP/s. Parts:
forward without / with the LoRA on every LM linear, the backward for activations only (gradient of the norm
scales: every layer's dX, no weight gradients), GA's value_and_grad (LoRA), NPO's (LoRA + the reference
forward), the bench's NPO and stage-1 train steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util

from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.unlearn import baselines as bl
from vleraser_jax.unlearn import lora as lora_lib
from vleraser_jax.unlearn import trainer as tr

from . import jax_steps, models


def _parts(model, params, size):
    """name -> (function, args) of every part."""
    batch = jax.tree_util.tree_map(jnp.asarray, models.make_batch(size))
    forget = {"forget": batch}
    cfg = bl.BaselineConfig(method="npo", lora_rank=size.rank, lora_alpha=float(size.rank), beta=jax_steps.NPO_BETA,
                            npo_nll="batch_mean", lora_pattern=lora_lib.LM_LINEARS)
    adapter, trainable, frozen = bl.prepare(model, params, cfg, jax.random.PRNGKey(0))
    npo_loss = bl.baseline_loss_fn(adapter, cfg)
    ga_loss = bl.baseline_loss_fn(adapter, bl.BaselineConfig(method="ga", lora_rank=size.rank,
                                                            lora_alpha=float(size.rank),
                                                            lora_pattern=lora_lib.LM_LINEARS))
    flat = traverse_util.flatten_dict(frozen["params"])
    norms = {k: v for k, v in flat.items() if "norm" in "/".join(map(str, k)).lower()}
    rest = {k: v for k, v in flat.items() if k not in norms}

    def plain_loss(norm_scales, others):
        logits = adapter.reference_logits({"params": traverse_util.unflatten_dict({**norm_scales, **others})}, batch)
        nll, count = tr.token_nll(logits, batch["labels"])
        return nll.sum() / count.sum()

    def plain_loss_grad(norm_scales, others):  # reference_logits stops gradients: differentiate _apply itself
        def f(ns):
            logits = adapter._apply({"params": traverse_util.unflatten_dict({**ns, **others})}, batch)
            nll, count = tr.token_nll(logits, batch["labels"])
            return nll.sum() / count.sum()
        return jax.value_and_grad(f)(norm_scales)

    npo_step, npo_state, npo_frozen, _ = jax_steps.npo(model, params, size)
    vle_step, vle_state, vle_frozen, _, _ = jax_steps.vl_eraser(model, params, size)
    return {
        "forward, no LoRA": (plain_loss, (norms, rest)),
        "forward, LoRA on every LM linear": (lambda fr, t: adapter.logits(fr, t, batch), (frozen, trainable)),
        "backward for activations only (no LoRA)": (plain_loss_grad, (norms, rest)),
        "GA value_and_grad (LoRA)": (lambda fr, t: jax.value_and_grad(lambda x: ga_loss(fr, x, forget, None)[0])(t),
                                     (frozen, trainable)),
        "NPO value_and_grad (LoRA + reference)": (
            lambda fr, t: jax.value_and_grad(lambda x: npo_loss(fr, x, forget, None)[0])(t), (frozen, trainable)),
        "NPO train step (bench)": (lambda s, f: npo_step(s, f, forget), (npo_state, npo_frozen)),
        "VL-Eraser stage-1 train step (bench)": (lambda s, f: vle_step(s, f, batch), (vle_state, vle_frozen)),
    }


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float((analysis or {}).get("flops", float("nan")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=sorted(models.SIZES))
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    size = models.SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        models.build_checkpoint(size, Path(tmp) / "ckpt")
        model, params, _ = load_pretrained(Path(tmp) / "ckpt")
    parts = _parts(model, params, size)
    print(f"NPO step breakdown at {args.size}: {len(parts)} parts, {args.rounds} interleaved rounds", flush=True)
    compiled = {name: jax.jit(fn).lower(*a).compile() for name, (fn, a) in parts.items()}
    times = {name: [] for name in parts}
    for name, (_, a) in parts.items():
        jax.block_until_ready(compiled[name](*a))  # warm-up
    for _ in range(args.rounds):
        for name, (_, a) in parts.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[name](*a))
            times[name].append(time.perf_counter() - t0)
    print("\n| part | ms (median) | min–max | XLA GFLOP | GFLOP/s |\n|---|---|---|---|---|")
    for name, ts in times.items():
        med, flops = statistics.median(ts), _flops(compiled[name])
        print(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f}–{max(ts) * 1e3:.1f} | {flops / 1e9:.1f} | "
              f"{flops / med / 1e9:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
