"""JAX vs PyTorch, side by side in one run on this machine: VL-Eraser stage-1 step, NPO step, greedy
generation, peak memory, and utilisation against the measured dense-matmul peak.

    python -m bench.run_bench --sizes tiny small [1b] [--steps 7] [--json bench/results.json]

Timings are interleaved pair by pair (JAX step, torch step, JAX step, ...), so a change in background load
hits both sides; each ratio is torch/JAX of one pair, and the table gives medians. Peak memory comes from
one child process per framework and size (VmHWM, reset between tasks), so neither framework's memory
counts against the other.
"""

from __future__ import annotations

import os

THREADS = 2
# Both frameworks get the same cores: XLA's CPU client sizes its pool from the affinity mask, torch is told.
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from . import models  # noqa: E402


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"); returns that RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kb("VmRSS")


def _median(xs):
    return float(statistics.median(xs))


# ------------------------------------------------------------------ torch side


def _torch_setup():
    import torch

    torch.set_num_threads(THREADS)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before torch's first parallel work
            pass
    return torch


def _torch_model(path):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype="float32").eval()
    model.generation_config.eos_token_id = None  # always generate max_new_tokens, as the JAX side
    return model


def _torch_generate(model, prompt, new_tokens):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(prompt["input_ids"]).long(),
                             attention_mask=torch.as_tensor(prompt["attention_mask"]).long(),
                             pixel_values=torch.as_tensor(prompt["pixel_values"]), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[:, prompt["input_ids"].shape[1]:].numpy()


# ------------------------------------------------------------------ JAX side


def _jax_generate(model, params, prompt, new_tokens):
    import jax

    from vleraser_jax.generate import generate

    out = generate(model, params, prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"],
                   max_new_tokens=new_tokens, eos_token_id=(), pad_token_id=0)
    return np.asarray(jax.device_get(out.tokens))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------ machine peak


def matmul_peak(n: int = 2048, reps: int = 7) -> dict:
    """Dense f32 [n, n] @ [n, n] throughput, best of `reps`, for XLA and torch on THREADS cores."""
    import jax
    import jax.numpy as jnp

    torch = _torch_setup()
    flops = 2.0 * n ** 3
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ja = jnp.asarray(a)
    mm = jax.jit(lambda x: x @ x)
    mm(ja).block_until_ready()
    tj = [_timed(lambda: mm(ja).block_until_ready())[0] for _ in range(reps)]
    ta_ = torch.from_numpy(a)
    torch.mm(ta_, ta_)
    tt = [_timed(lambda: torch.mm(ta_, ta_))[0] for _ in range(reps)]
    res = {"n": n, "jax_gflops": flops / min(tj) / 1e9, "torch_gflops": flops / min(tt) / 1e9}
    res["peak_gflops"] = max(res["jax_gflops"], res["torch_gflops"])
    return res


# ------------------------------------------------------------------ one size, pair by pair


def bench_size(size: models.Size, steps: int, warmup: int, gen_reps: int, ckpt: str, log) -> dict:
    import jax

    from vleraser_jax.checkpoints import load_pretrained

    from . import jax_steps
    from . import torch_reference as ref

    _torch_setup()
    tmodel = _torch_model(ckpt)
    model, params, _ = load_pretrained(ckpt)
    res: dict = {"size": size.name, "params": models.param_count(params), "batch": size.batch, "seq": size.seq_len}
    batch = models.make_batch(size)
    tbatch = ref.to_torch(batch)
    flops_a = models.analytic_matmul_flops(size, size.batch, size.seq_len)

    def pairs(name, jstep, state, frozen, jbatch, tstep, analytic):
        t0 = time.perf_counter()
        compiled = jstep.lower(state, frozen, jbatch).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        jt, tt, ratios, jl, tl = [], [], [], [], []
        first_torch = None
        for i in range(warmup + steps):
            t_j, (state, metrics) = _timed(lambda: jax.block_until_ready(compiled(state, frozen, jbatch)))
            t_t, loss = _timed(lambda: tstep(tbatch))
            if i == 0:
                first_torch = t_t
            jl.append(float(metrics["loss"]))
            tl.append(float(loss))
            if i >= warmup:
                jt.append(t_j)
                tt.append(t_t)
                ratios.append(t_t / t_j)
        out = {"compile_s": compile_s, "torch_first_step_s": first_torch, "jax_s": _median(jt),
               "torch_s": _median(tt), "ratio": _median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "jax_all_s": jt, "torch_all_s": tt, "xla_flops": float(cost["flops"]), "analytic_flops": analytic,
               "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(jl, tl)), "n": steps}
        log(f"  {name}: jax {out['jax_s'] * 1e3:.1f} ms, torch {out['torch_s'] * 1e3:.1f} ms, torch/jax "
            f"{out['ratio']:.2f} (compile {compile_s:.1f} s), loss rel diff {out['max_loss_rel_diff']:.1e}")
        return out

    # VL-Eraser stage 1: LM fwd + its input-gradient backward (≈ 2 LM fwd) + the vision tower fwd
    jstep, state, frozen, lora, projectors = jax_steps.vl_eraser(model, params, size)
    tl = ref.TorchLoRA(tmodel, jax.device_get(lora), jax.device_get(projectors))
    tstep = ref.Step(tl, lambda l, b: ref.vl_eraser_loss(l, b, 0.5), jax_steps.LR, jax_steps.WEIGHT_DECAY,
                     max_grad_norm=jax_steps.MAX_GRAD_NORM)
    res["vl_eraser"] = pairs("vl_eraser", jstep, state, frozen, batch, tstep, flops_a["vision"] + 2 * flops_a["lm"])
    tl.remove()
    del jstep, state, frozen

    # NPO: the same plus a no-grad reference forward (vision + LM)
    jstep, state, frozen, lora = jax_steps.npo(model, params, size)
    tl = ref.TorchLoRA(tmodel, jax.device_get(lora), capture=None)
    tstep = ref.Step(tl, lambda l, b: ref.npo_loss(l, b, jax_steps.NPO_BETA), jax_steps.LR,
                     jax_steps.WEIGHT_DECAY, max_grad_norm=jax_steps.MAX_GRAD_NORM)
    res["npo"] = pairs("npo", jstep, state, frozen, {"forget": batch}, tstep,
                       2 * flops_a["vision"] + 3 * flops_a["lm"])
    tl.remove()
    del jstep, state, frozen

    # greedy generation, batch 1: prefill (image + prompt) then new_tokens decode steps
    prompt = models.make_prompt(size)
    n_new = size.gen_new_tokens
    first_jax, jtok = _timed(lambda: _jax_generate(model, params, prompt, n_new))
    first_torch, ttok = _timed(lambda: _torch_generate(tmodel, prompt, n_new))
    jt, tt, ratios = [], [], []
    for _ in range(gen_reps):
        t_j, jtok = _timed(lambda: _jax_generate(model, params, prompt, n_new))
        t_t, ttok = _timed(lambda: _torch_generate(tmodel, prompt, n_new))
        jt.append(t_j)
        tt.append(t_t)
        ratios.append(t_t / t_j)
    res["generate"] = {"new_tokens": n_new, "prompt_len": int(prompt["input_ids"].shape[1]),
                       "jax_first_call_s": first_jax, "torch_first_call_s": first_torch,
                       "jax_tok_s": n_new / _median(jt), "torch_tok_s": n_new / _median(tt), "ratio": _median(ratios),
                       "ratio_min": min(ratios), "ratio_max": max(ratios), "jax_all_s": jt, "torch_all_s": tt,
                       "tokens_equal": bool(np.array_equal(jtok, ttok)), "n": gen_reps}
    g = res["generate"]
    log(f"  generate: jax {g['jax_tok_s']:.1f} tok/s, torch {g['torch_tok_s']:.1f} tok/s, jax/torch speed "
        f"{g['ratio']:.2f}, tokens equal: {g['tokens_equal']}")
    return res


# ------------------------------------------------------------------ memory children


def memory_child(framework: str, size: models.Size, ckpt: str) -> dict:
    """Peak RSS per task in a process holding one framework only: VmHWM reset before each task."""
    base = _rss_kb("VmRSS")
    out: dict = {"framework": framework, "rss_after_import_mb": base / 1024}
    batch = models.make_batch(size)
    prompt = models.make_prompt(size)
    if framework == "jax":
        import jax

        from vleraser_jax.checkpoints import load_pretrained

        from . import jax_steps

        model, params, _ = load_pretrained(ckpt)
        out["rss_model_mb"] = _rss_kb("VmRSS") / 1024
        tasks = {
            "vl_eraser": lambda: jax_steps.vl_eraser(model, params, size)[:3],
            "npo": lambda: jax_steps.npo(model, params, size)[:3],
        }
        for name, make in tasks.items():
            rss0 = _reset_peak()
            step, state, frozen = make()
            b = {"forget": batch} if name == "npo" else batch
            for _ in range(2):
                state, m = step(state, frozen, b)
                jax.block_until_ready(m)
            out[name] = {"rss_before_mb": rss0 / 1024, "peak_mb": _rss_kb("VmHWM") / 1024}
            del step, state, frozen
        rss0 = _reset_peak()
        for _ in range(2):
            _jax_generate(model, params, prompt, size.gen_new_tokens)
        out["generate"] = {"rss_before_mb": rss0 / 1024, "peak_mb": _rss_kb("VmHWM") / 1024}
    else:
        from . import torch_reference as ref

        _torch_setup()
        tmodel = _torch_model(ckpt)
        out["rss_model_mb"] = _rss_kb("VmRSS") / 1024
        tbatch = ref.to_torch(batch)
        for name in ("vl_eraser", "npo"):
            rss0 = _reset_peak()
            if name == "vl_eraser":
                tl = ref.TorchLoRA(tmodel, models.lora_tree_np(size), models.vle_projectors(size))
                step = ref.Step(tl, lambda l, b: ref.vl_eraser_loss(l, b, 0.5), 1e-3, 0.01)
            else:
                tl = ref.TorchLoRA(tmodel, models.lora_tree_np(size, models.LM_LINEARS), capture=None)
                step = ref.Step(tl, lambda l, b: ref.npo_loss(l, b, 0.4), 1e-3, 0.01)
            for _ in range(2):
                step(tbatch)
            out[name] = {"rss_before_mb": rss0 / 1024, "peak_mb": _rss_kb("VmHWM") / 1024}
            tl.remove()
            del tl, step
        rss0 = _reset_peak()
        for _ in range(2):
            _torch_generate(tmodel, prompt, size.gen_new_tokens)
        out["generate"] = {"rss_before_mb": rss0 / 1024, "peak_mb": _rss_kb("VmHWM") / 1024}
    return out


def run_memory_child(framework, size, ckpt, log) -> dict | None:
    cmd = [sys.executable, "-m", "bench.run_bench", "--child", framework, "--sizes", size.name, "--ckpt", ckpt]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    if proc.returncode != 0:
        log(f"  memory child {framework} failed:\n{proc.stderr[-2000:]}")
        return None
    line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
    log(f"  memory child {framework}: {time.perf_counter() - t0:.0f} s")
    return json.loads(line)


# ------------------------------------------------------------------ report


def machine_info() -> dict:
    import jax
    import torch

    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "mem_gb": mem_kb / 2 ** 20, "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": __import__("transformers").__version__, "load_avg_start": os.getloadavg()}


def tables(results: dict) -> str:
    peak = results["matmul"]["peak_gflops"]
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs (affinity {m['affinity']}), {m['mem_gb']:.0f} GB; "
             f"jax {m['jax']} ({m['jax_backend']}), torch {m['torch']} ({m['torch_threads']} threads), "
             f"transformers {m['transformers']}; load average at start {m['load_avg_start'][0]:.2f}.",
             f"Dense f32 matmul peak ({results['matmul']['n']}²): XLA {results['matmul']['jax_gflops']:.1f} GFLOP/s, "
             f"torch {results['matmul']['torch_gflops']:.1f} GFLOP/s; peak used = {peak:.1f} GFLOP/s.", "",
             "| size | params | step | batch×seq | JAX ms | torch ms | torch/JAX (min–max) | JAX compile s | "
             "torch 1st step s | XLA GFLOP/step | JAX util | torch util |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        for step in ("vl_eraser", "npo"):
            s = r[step]
            gf = s["xla_flops"] / 1e9
            lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {step} | {r['batch']}×{r['seq']} | "
                         f"{s['jax_s'] * 1e3:.1f} | {s['torch_s'] * 1e3:.1f} | **{s['ratio']:.2f}** "
                         f"({s['ratio_min']:.2f}–{s['ratio_max']:.2f}) | {s['compile_s']:.1f} | "
                         f"{s['torch_first_step_s']:.2f} | {gf:.2f} | {gf / s['jax_s'] / peak:.1%} | "
                         f"{gf / s['torch_s'] / peak:.1%} |")
    lines += ["", "| size | prompt + new tokens | JAX tok/s | torch tok/s | JAX/torch speed (min–max) | "
              "JAX 1st call s (compile) | torch 1st call s | same tokens |", "|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        g = r["generate"]
        lines.append(f"| {r['size']} | {g['prompt_len']} + {g['new_tokens']} | {g['jax_tok_s']:.1f} | "
                     f"{g['torch_tok_s']:.1f} | **{g['ratio']:.2f}** ({g['ratio_min']:.2f}–{g['ratio_max']:.2f}) | "
                     f"{g['jax_first_call_s']:.1f} | {g['torch_first_call_s']:.2f} | {g['tokens_equal']} |")
    mem = [r for r in results["sizes"] if r.get("memory")]
    if mem:
        lines += ["", "| size | framework | RSS with model MB | vl_eraser peak MB | npo peak MB | generate peak MB |",
                  "|---|---|---|---|---|---|"]
        for r in mem:
            for fw in ("jax", "torch"):
                c = r["memory"].get(fw)
                if c is None:
                    lines.append(f"| {r['size']} | {fw} | failed | | | |")
                    continue
                lines.append(f"| {r['size']} | {fw} | {c['rss_model_mb']:.0f} | {c['vl_eraser']['peak_mb']:.0f} | "
                             f"{c['npo']['peak_mb']:.0f} | {c['generate']['peak_mb']:.0f} |")
    lines += ["", "Analytic matmul FLOPs per step vs XLA's count: " + ", ".join(
        f"{r['size']} {step} {r[step]['analytic_flops'] / 1e9:.3g} vs {r[step]['xla_flops'] / 1e9:.3g} GFLOP"
        for r in results["sizes"] for step in ("vl_eraser", "npo"))]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(models.SIZES))
    p.add_argument("--steps", type=int, default=7, help="timed steps per side (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gen-reps", type=int, default=5)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None, help="write all measurements here")
    p.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(args.child, models.SIZES[args.sizes[0]], args.ckpt)))
        return

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    results = {"machine": machine_info(), "threads": THREADS, "args": vars(args)}
    results["matmul"] = matmul_peak()
    log(f"matmul peak: {results['matmul']}")
    results["sizes"] = []
    for name in args.sizes:
        size = models.SIZES[name]
        log(f"size {name}:")
        with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as ckpt:
            tm = models.build_checkpoint(size, ckpt)
            del tm
            r = bench_size(size, args.steps, args.warmup, args.gen_reps, ckpt, log)
            if not args.no_memory:
                r["memory"] = {fw: run_memory_child(fw, size, ckpt, log) for fw in ("jax", "torch")}
        results["sizes"].append(r)
    results["matmul_end"] = matmul_peak()  # did the machine's speed drift during the run?
    results["load_avg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    text = tables(results)
    text += (f"\nMatmul peak re-measured at the end: XLA {results['matmul_end']['jax_gflops']:.1f}, torch "
             f"{results['matmul_end']['torch_gflops']:.1f} GFLOP/s; load average at end "
             f"{results['load_avg_end'][0]:.2f}; whole run {results['wall_s']:.0f} s.")
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
