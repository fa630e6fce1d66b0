"""JAX vs PyTorch eager and torch.compile, side by side in one run on this machine: VL-Eraser stage-1 step, NPO
step, greedy generation, peak memory, and utilisation against both libraries' measured dense-matmul peaks.

    python -m bench.run_bench --sizes tiny small 1b --steps 7 --warmup 2 --gen-reps 5 --json bench/results.json

Timings are interleaved step by step (JAX, torch eager, torch.compile, JAX, ...), so a change in background load
hits every side; each ratio is torch/JAX of one such round, and the tables give medians (min–max). torch.compile
(inductor, default mode; generation: transformers' static cache with the forward compiled) is timed after its
compile, which is reported apart. Peak memory comes from one child process per framework and size (VmHWM,
reset between tasks), so no framework's memory counts against another.
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


def _torch_generate(model, prompt, new_tokens, static: bool = False):
    import torch

    extra = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(prompt["input_ids"]).long(),
                             attention_mask=torch.as_tensor(prompt["attention_mask"]).long(),
                             pixel_values=torch.as_tensor(prompt["pixel_values"]), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, **extra)
    return out[:, prompt["input_ids"].shape[1]:].numpy()


def _compiled_torch_model(path):
    """A second torch model whose forward is torch.compile'd (inductor, default mode); generation uses a static
    cache so the decode step keeps one shape."""
    import torch

    model = _torch_model(path)
    model.forward = torch.compile(model.forward, dynamic=False)
    return model


def _compiled_loss(loss):
    import torch

    return torch.compile(loss, dynamic=False)


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


def _rounds(name, jstep, state, frozen, jbatch, torch_steps: dict, tbatch, analytic, steps, warmup, log) -> dict:
    """Interleaved rounds: the JAX step, then each torch step (eager, compiled) on the same batch."""
    import jax

    t0 = time.perf_counter()
    compiled = jstep.lower(state, frozen, jbatch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    times = {"jax": [], **{k: [] for k in torch_steps}}
    firsts = {}
    losses = {"jax": [], **{k: [] for k in torch_steps}}
    for i in range(warmup + steps):
        t_j, (state, metrics) = _timed(lambda: jax.block_until_ready(compiled(state, frozen, jbatch)))
        losses["jax"].append(float(metrics["loss"]))
        if i >= warmup:
            times["jax"].append(t_j)
        for fw, step in torch_steps.items():
            t_t, loss = _timed(lambda: step(tbatch))
            if i == 0:
                firsts[fw] = t_t
            losses[fw].append(float(loss))
            if i >= warmup:
                times[fw].append(t_t)
    out = {"compile_s": compile_s, "xla_flops": float(cost["flops"]), "analytic_flops": analytic, "n": steps,
           "jax_s": _median(times["jax"]), "jax_all_s": times["jax"]}
    for fw in torch_steps:
        ratios = [t / j for t, j in zip(times[fw], times["jax"])]
        med = _median(times[fw])
        out[fw] = {"s": med, "all_s": times[fw], "ratio": _median(ratios), "ratio_min": min(ratios),
                   "ratio_max": max(ratios), "first_step_s": firsts[fw],
                   # the compiled step's first call holds its compile (the eager one's only warm-up)
                   "compile_s": max(firsts[fw] - med, 0.0) if fw == "torch_compile" else 0.0,
                   "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses["jax"], losses[fw]))}
    log(f"  {name}: jax {out['jax_s'] * 1e3:.1f} ms (compile {compile_s:.1f} s); " + "; ".join(
        f"{fw} {out[fw]['s'] * 1e3:.1f} ms, torch/jax {out[fw]['ratio']:.2f}, loss rel diff "
        f"{out[fw]['max_loss_rel_diff']:.1e}" for fw in torch_steps))
    return out


def _torch_steps(models_by_fw: dict, make_lora, loss) -> tuple[dict, list]:
    """{framework: ref.Step} over each torch model (eager and compiled), and the LoRA hooks to remove after."""
    from . import jax_steps
    from . import torch_reference as ref

    steps, hooks = {}, []
    for fw, tmodel in models_by_fw.items():
        tl = make_lora(tmodel)
        hooks.append(tl)
        fn = _compiled_loss(loss) if fw == "torch_compile" else loss
        steps[fw] = ref.Step(tl, fn, jax_steps.LR, jax_steps.WEIGHT_DECAY, max_grad_norm=jax_steps.MAX_GRAD_NORM)
    return steps, hooks


def bench_size(size: models.Size, steps: int, warmup: int, gen_reps: int, ckpt: str, log,
               compile_torch: bool = True) -> dict:
    import jax

    from vleraser_jax.checkpoints import load_pretrained

    from . import jax_steps
    from . import torch_reference as ref

    _torch_setup()
    torch_models = {"torch_eager": _torch_model(ckpt)}
    if compile_torch:
        torch_models["torch_compile"] = _compiled_torch_model(ckpt)
    model, params, _ = load_pretrained(ckpt)
    res: dict = {"size": size.name, "params": models.param_count(params), "batch": size.batch, "seq": size.seq_len}
    batch = models.make_batch(size)
    tbatch = ref.to_torch(batch)
    flops_a = models.analytic_matmul_flops(size, size.batch, size.seq_len)

    # VL-Eraser stage 1: the teacher's LoRA-free forward, the CE forward + its backward, the vision tower
    jstep, state, frozen, lora, projectors = jax_steps.vl_eraser(model, params, size)
    lora_np, proj_np = jax.device_get(lora), jax.device_get(projectors)
    tsteps, hooks = _torch_steps(torch_models, lambda m: ref.TorchLoRA(m, lora_np, proj_np),
                                 lambda l, b: ref.vl_eraser_loss(l, b, 0.5))
    res["vl_eraser"] = _rounds("vl_eraser", jstep, state, frozen, batch, tsteps, tbatch,
                               2 * flops_a["vision"] + 3 * flops_a["lm"], steps, warmup, log)
    for h in hooks:
        h.remove()
    del jstep, state, frozen

    # NPO: the same plus a no-grad reference forward (vision + LM)
    jstep, state, frozen, lora = jax_steps.npo(model, params, size)
    lora_np = jax.device_get(lora)
    tsteps, hooks = _torch_steps(torch_models, lambda m: ref.TorchLoRA(m, lora_np, capture=None),
                                 lambda l, b: ref.npo_loss(l, b, jax_steps.NPO_BETA))
    res["npo"] = _rounds("npo", jstep, state, frozen, {"forget": batch}, tsteps, tbatch,
                         2 * flops_a["vision"] + 3 * flops_a["lm"], steps, warmup, log)
    for h in hooks:
        h.remove()
    del jstep, state, frozen
    res["generate"] = bench_generate(size, model, params, torch_models, gen_reps, log)
    return res


def bench_generate(size, model, params, torch_models: dict, gen_reps: int, log) -> dict:
    """Greedy generation, batch 1: prefill (image + prompt) then new_tokens decode steps; eager torch with its
    dynamic cache, compiled torch with a static cache."""
    prompt = models.make_prompt(size)
    n_new = size.gen_new_tokens
    runners = {"jax": lambda: _jax_generate(model, params, prompt, n_new),
               **{fw: (lambda m=m, fw=fw: _torch_generate(m, prompt, n_new, static=fw == "torch_compile"))
                  for fw, m in torch_models.items()}}
    first = {fw: _timed(run) for fw, run in runners.items()}
    times = {fw: [] for fw in runners}
    tokens = {fw: out for fw, (_, out) in first.items()}
    for _ in range(gen_reps):
        for fw, run in runners.items():
            t, tokens[fw] = _timed(run)
            times[fw].append(t)
    out = {"new_tokens": n_new, "prompt_len": int(prompt["input_ids"].shape[1]), "n": gen_reps,
           "jax_first_call_s": first["jax"][0], "jax_tok_s": n_new / _median(times["jax"]), "jax_all_s": times["jax"]}
    for fw in torch_models:
        speed = [t / j for t, j in zip(times[fw], times["jax"])]
        out[fw] = {"tok_s": n_new / _median(times[fw]), "ratio": _median(speed), "ratio_min": min(speed),
                   "ratio_max": max(speed), "first_call_s": first[fw][0], "all_s": times[fw],
                   "compile_s": max(first[fw][0] - _median(times[fw]), 0.0) if fw == "torch_compile" else 0.0,
                   "tokens_equal": bool(np.array_equal(tokens["jax"], tokens[fw]))}
    log("  generate: jax " + f"{out['jax_tok_s']:.1f} tok/s; " + "; ".join(
        f"{fw} {out[fw]['tok_s']:.1f} tok/s, jax/torch speed {out[fw]['ratio']:.2f}, same tokens "
        f"{out[fw]['tokens_equal']}" for fw in torch_models))
    return out


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
        compiled = framework == "torch_compile"
        tmodel = _compiled_torch_model(ckpt) if compiled else _torch_model(ckpt)
        wrap = _compiled_loss if compiled else (lambda f: f)
        out["rss_model_mb"] = _rss_kb("VmRSS") / 1024
        tbatch = ref.to_torch(batch)
        for name in ("vl_eraser", "npo"):
            rss0 = _reset_peak()
            if name == "vl_eraser":
                tl = ref.TorchLoRA(tmodel, models.lora_tree_np(size), models.vle_projectors(size))
                step = ref.Step(tl, wrap(lambda l, b: ref.vl_eraser_loss(l, b, 0.5)), 1e-3, 0.01)
            else:
                tl = ref.TorchLoRA(tmodel, models.lora_tree_np(size, models.LM_LINEARS), capture=None)
                step = ref.Step(tl, wrap(lambda l, b: ref.npo_loss(l, b, 0.4)), 1e-3, 0.01)
            for _ in range(2):
                step(tbatch)
            out[name] = {"rss_before_mb": rss0 / 1024, "peak_mb": _rss_kb("VmHWM") / 1024}
            tl.remove()
            del tl, step
        rss0 = _reset_peak()
        for _ in range(2):
            _torch_generate(tmodel, prompt, size.gen_new_tokens, static=compiled)
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


TORCH_FRAMEWORKS = ("torch_eager", "torch_compile")


def _frameworks(r: dict) -> list[str]:
    return [fw for fw in TORCH_FRAMEWORKS if fw in r["vl_eraser"]]


def tables(results: dict) -> str:
    mm = results["matmul"]
    m = results["machine"]
    peaks = {"jax": mm["jax_gflops"], "torch_eager": mm["torch_gflops"], "torch_compile": mm["torch_gflops"]}
    lines = [f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs (affinity {m['affinity']}), {m['mem_gb']:.0f} GB; "
             f"jax {m['jax']} ({m['jax_backend']}), torch {m['torch']} ({m['torch_threads']} threads), "
             f"transformers {m['transformers']}; load average at start {m['load_avg_start'][0]:.2f}.",
             f"Dense f32 matmul peak ({mm['n']}²): XLA {mm['jax_gflops']:.1f} GFLOP/s, torch (MKL/oneDNN) "
             f"{mm['torch_gflops']:.1f} GFLOP/s. Utilisation = XLA's FLOP count per step / time / *that framework's "
             "own* matmul peak, so a faster BLAS on one machine does not pass for better work.", "",
             "| size | params | step | batch×seq | framework | ms | torch/JAX time (min–max) | compile s | util |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        for step in ("vl_eraser", "npo"):
            s = r[step]
            gf = s["xla_flops"] / 1e9
            head = f"| {r['size']} | {r['params'] / 1e6:.1f}M | {step} | {r['batch']}×{r['seq']} |"
            lines.append(f"{head} jax | {s['jax_s'] * 1e3:.1f} | 1 | {s['compile_s']:.1f} | "
                         f"{gf / s['jax_s'] / peaks['jax']:.1%} |")
            for fw in _frameworks(r):
                t = s[fw]
                lines.append(f"{head} {fw} | {t['s'] * 1e3:.1f} | **{t['ratio']:.2f}** ({t['ratio_min']:.2f}–"
                             f"{t['ratio_max']:.2f}) | {t['compile_s']:.1f} | {gf / t['s'] / peaks[fw]:.1%} |")
    lines += ["", "| size | prompt + new tokens | framework | tok/s | JAX/torch speed (min–max) | compile s | "
              "same tokens as JAX |", "|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        g = r["generate"]
        head = f"| {r['size']} | {g['prompt_len']} + {g['new_tokens']} |"
        lines.append(f"{head} jax | {g['jax_tok_s']:.1f} | 1 | {g['jax_first_call_s']:.1f} (first call) | |")
        for fw in _frameworks(r):
            t = g[fw]
            lines.append(f"{head} {fw} | {t['tok_s']:.1f} | **{t['ratio']:.2f}** ({t['ratio_min']:.2f}–"
                         f"{t['ratio_max']:.2f}) | {t['compile_s']:.1f} | {t['tokens_equal']} |")
    mem = [r for r in results["sizes"] if r.get("memory")]
    if mem:
        lines += ["", "| size | framework | RSS with model MB | vl_eraser peak MB | npo peak MB | generate peak MB |",
                  "|---|---|---|---|---|---|"]
        for r in mem:
            for fw, c in r["memory"].items():
                if c is None:
                    lines.append(f"| {r['size']} | {fw} | failed | | | |")
                    continue
                lines.append(f"| {r['size']} | {fw} | {c['rss_model_mb']:.0f} | {c['vl_eraser']['peak_mb']:.0f} | "
                             f"{c['npo']['peak_mb']:.0f} | {c['generate']['peak_mb']:.0f} |")
    lines += ["", "Analytic matmul FLOPs per step vs XLA's count: " + ", ".join(
        f"{r['size']} {step} {r[step]['analytic_flops'] / 1e9:.3g} vs {r[step]['xla_flops'] / 1e9:.3g} GFLOP"
        for r in results["sizes"] for step in ("vl_eraser", "npo"))]
    return "\n".join(lines)


def records(results: dict) -> list[dict]:
    """One record per (size, step, framework): median_ms, compile_s, peak_rss_mb (None without memory runs)."""
    out = []
    for r in results["sizes"]:
        memory = r.get("memory") or {}
        for step in ("vl_eraser", "npo", "generate"):
            s = r[step]
            per_call = (lambda xs: _median(xs) * 1e3)
            peak = lambda fw: (memory.get(fw) or {}).get(step, {}).get("peak_mb")
            jax_ms = per_call(s["jax_all_s"])
            out.append({"size": r["size"], "step": step, "framework": "jax", "median_ms": jax_ms,
                        "compile_s": s.get("compile_s", s.get("jax_first_call_s")), "peak_rss_mb": peak("jax")})
            for fw in _frameworks(r):
                out.append({"size": r["size"], "step": step, "framework": fw, "median_ms": per_call(s[fw]["all_s"]),
                            "compile_s": s[fw]["compile_s"], "peak_rss_mb": peak(fw)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(models.SIZES))
    p.add_argument("--steps", type=int, default=7, help="timed steps per side (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gen-reps", type=int, default=5)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="torch eager only (skip torch.compile)")
    p.add_argument("--json", default=None, help="write one record per (size, step, framework) here, and every "
                                                "measurement to <json>.full.json")
    p.add_argument("--child", choices=["jax", *TORCH_FRAMEWORKS], help=argparse.SUPPRESS)
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
    frameworks = ["jax", "torch_eager"] + ([] if args.no_compile else ["torch_compile"])
    for name in args.sizes:
        size = models.SIZES[name]
        log(f"size {name}:")
        with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as ckpt:
            tm = models.build_checkpoint(size, ckpt)
            del tm
            r = bench_size(size, args.steps, args.warmup, args.gen_reps, ckpt, log, compile_torch=not args.no_compile)
            if not args.no_memory:
                r["memory"] = {fw: run_memory_child(fw, size, ckpt, log) for fw in frameworks}
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
            json.dump(records(results), f, indent=1, default=float)
        with open(args.json.removesuffix(".json") + ".full.json", "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
