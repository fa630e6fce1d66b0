"""One-shot accelerator check (`bench/accelerator_check.sh`): for a session that is lent a GPU.

Within a time budget it measures, on whatever JAX and torch see:
  1. logits parity against torch transformers in f32 and bf16 (the same random LLaVA checkpoint on both sides);
  2. the VL-Eraser stage-1 step (the package's own, `bench.jax_steps.vl_eraser`): median step time, XLA's FLOP
     count from cost analysis, MFU = FLOPs / time / the device's dense bf16 peak;
  3. greedy KV-cache generation: tokens/s;
with `attention_impl="cudnn"` on a GPU (the reference einsum elsewhere). On a CPU it runs the same code at the
tiny size and marks what needs a GPU as skipped, so CI keeps it from rotting. Results go to one JSON file.

7B shapes with random weights are not attempted: that path has never run on an accelerator here (no session
had one), and an untested 7B allocation inside an 8-minute budget would more likely cost the run than inform.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import models

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by `device_kind` substring, from the vendors' data sheets.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "V100": 125e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12}


def device_peak(kind: str) -> float | None:
    for name, peak in BF16_PEAK.items():
        if name.lower() in kind.lower():
            return peak
    return None


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's scale (as tests/test_llava_parity.py)."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def logits_parity(ckpt: str, size: models.Size, attention: str, on_gpu: bool) -> dict:
    """Our logits vs torch's in f32 and bf16; bf16 errors are against torch f32, each side's bf16 beside."""
    import jax
    import torch
    from transformers import LlavaForConditionalGeneration

    from vleraser_jax.checkpoints import load_pretrained

    from .torch_reference import _forward, to_torch

    device = "cuda" if on_gpu else "cpu"
    batch = models.make_batch(size, pad_last=2)
    tbatch = {k: v.to(device) for k, v in to_torch(batch).items()}
    out: dict = {}
    reference = None
    for dtype in ("float32", "bfloat16"):
        tmodel = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=getattr(torch, dtype)).to(device).eval()
        tb = {k: (v.to(getattr(torch, dtype)) if v.is_floating_point() else v) for k, v in tbatch.items()}
        with torch.no_grad():
            tlogits = _forward(tmodel, tb).float().cpu().numpy()
        del tmodel
        model, params, _ = load_pretrained(ckpt, dtype=dtype, attention_impl=attention)
        # f32 means f32: no TF32 matmuls on either side (torch's default; XLA's GPU default is TF32)
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            jlogits = np.asarray(model.apply({"params": params}, input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"],
                                             pixel_values=batch["pixel_values"]).logits, np.float32)
        real = batch["attention_mask"].astype(bool)
        if dtype == "float32":
            reference = tlogits
            out[dtype] = {"max_rel_vs_torch": _max_rel(jlogits[real], tlogits[real])}
        else:
            out[dtype] = {"jax_max_rel_vs_torch_f32": _max_rel(jlogits[real], reference[real]),
                          "torch_max_rel_vs_torch_f32": _max_rel(tlogits[real], reference[real]),
                          "jax_vs_torch_bf16": _max_rel(jlogits[real], tlogits[real])}
    out["float32"]["ok"] = out["float32"]["max_rel_vs_torch"] < 1e-4  # tests/test_llava_parity.py's tolerance
    b = out["bfloat16"]
    b["ok"] = b["jax_max_rel_vs_torch_f32"] <= 2.0 * b["torch_max_rel_vs_torch_f32"] + 1e-3
    return out


def stage1_step(ckpt: str, size: models.Size, attention: str, steps: int, peak: float | None) -> dict:
    """The package's VL-Eraser stage-1 step in bf16 compute: median time, XLA FLOPs, MFU."""
    import jax

    from vleraser_jax.checkpoints import load_pretrained

    from . import jax_steps

    model, params, _ = load_pretrained(ckpt, dtype="bfloat16", attention_impl=attention)
    step, state, frozen, _, _ = jax_steps.vl_eraser(model, params, size)
    batch = models.make_batch(size)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, frozen, batch))
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {"compile_s": compile_s, "median_ms": median * 1e3, "all_ms": [t * 1e3 for t in times],
            "xla_flops": flops, "loss": float(metrics["loss"]),
            "mfu": flops / median / peak if peak else None}


def generation(ckpt: str, size: models.Size, attention: str, reps: int) -> dict:
    import jax

    from vleraser_jax.checkpoints import load_pretrained
    from vleraser_jax.generate import generate

    model, params, _ = load_pretrained(ckpt, dtype="bfloat16", attention_impl=attention)
    prompt = models.make_prompt(size)
    n_new = size.gen_new_tokens

    def run():
        out = generate(model, params, prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"],
                       max_new_tokens=n_new, eos_token_id=(), pad_token_id=0)
        return jax.block_until_ready(out.tokens)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "tok_s": n_new / float(np.median(times)), "new_tokens": n_new}


def run_check(out_path: Path, size_name: str | None, steps: int, reps: int, budget_s: float, log=print) -> dict:
    import jax
    import torch

    started = time.perf_counter()
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    kind = jax.devices()[0].device_kind
    size = models.SIZES[size_name or ("1b" if on_gpu else "tiny")]
    attention = "cudnn" if on_gpu else "reference"
    result: dict = {"backend": jax.default_backend(), "device_kind": kind, "devices": jax.device_count(),
                    "torch_cuda": torch.cuda.is_available(), "size": size.name, "attention_impl": attention,
                    "bf16_peak_flops": device_peak(kind) if on_gpu else None, "skipped": []}
    if not on_gpu:
        result["skipped"] += ["GPU: no CUDA device for JAX and torch; ran at the tiny size on the CPU",
                              "cuDNN attention", "MFU (no accelerator peak)"]
    result["skipped"].append("7B shapes (see the module docstring)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "ckpt")
        models.build_checkpoint(size, ckpt)
        parts = (("parity", lambda: logits_parity(ckpt, size, attention, on_gpu)),
                 ("stage1_step", lambda: stage1_step(ckpt, size, attention, steps, result["bf16_peak_flops"])),
                 ("generation", lambda: generation(ckpt, size, attention, reps)))
        for name, fn in parts:
            if time.perf_counter() - started > budget_s:
                result["skipped"].append(f"{name}: the {budget_s:.0f} s budget was spent")
                continue
            log(f"accelerator check: {name} ({size.name}, {result['backend']})")
            result[name] = fn()
            log(f"  {json.dumps(result[name])[:300]}")
    result["seconds"] = time.perf_counter() - started
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    log(f"wrote {out_path}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", ".") + "/accelerator_check.json")
    p.add_argument("--size", choices=sorted(models.SIZES), default=None, help="default: 1b on a GPU, tiny on CPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new part after this many seconds")
    args = p.parse_args(argv)
    result = run_check(Path(args.out), args.size, args.steps, args.reps, args.budget_s)
    parity = result.get("parity", {})
    return 0 if all(parity.get(d, {}).get("ok", True) for d in ("float32", "bfloat16")) else 1


if __name__ == "__main__":
    sys.exit(main())
