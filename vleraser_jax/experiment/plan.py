"""`vleraser plan`: will it fit? Compile the real sharded programs from abstract shapes, report per device.

Nothing is allocated and no checkpoint is read: the architecture comes from the config's `model.hf_config`
(the numbers of the model's config.json), parameters and batches are `jax.ShapeDtypeStruct`s carrying
their shardings, and `jax.jit(...).lower(...).compile()` builds the exact programs training and evaluation
run (VL-Eraser's stage-1 step with its optimizer state, LoRA, frozen f32 weights and vacuum projectors;
the jitted prefill + decode loop). XLA's `memory_analysis()` gives each device's argument / output /
temporary bytes and `cost_analysis()` its FLOPs.

On a laptop the mesh is simulated with that many CPU devices (`jax_num_cpu_devices`), so the compiler is
XLA:CPU: its buffer assignment approximates, not equals, what XLA:GPU / XLA:TPU would allocate (different
fusion and, on GPU, cuDNN flash attention instead of materialised attention probabilities). Use the
numbers to rule configurations in or out, with a margin; `--backend default` compiles for the devices
actually present instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

GIB = 1024**3


# XLA:CPU's default scheduler favours concurrency and keeps many more buffers alive than an accelerator
# would (measured: +60% temporary memory on a 4-layer 7B stage-1 step); plan with its memory-optimised one.
CPU_PLAN_FLAGS = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def ensure_devices(n: int, backend: str = "cpu") -> None:
    """Make `n` simulated CPU devices available (must run before JAX initialises its backends)."""
    import os

    import jax
    from jax._src import xla_bridge

    if backend == "cpu" and not xla_bridge.backends_are_initialized():
        if CPU_PLAN_FLAGS not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_PLAN_FLAGS).strip()
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", max(n, 1))
    have = len(jax.devices())
    if have < n:
        raise RuntimeError(
            f"the mesh needs {n} devices but JAX has {have}; run the planner in a fresh process, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts"
        )


def build_model(c, dtype: str | None = None, attention: str | None = None, remat: str | None = None):
    """The config's model from `c.model.hf_config` (no weights)."""
    from ..models.configs import LlavaConfig, Qwen2VLConfig
    from ..models.llava import LlavaForConditionalGeneration
    from ..models.qwen2_vl import Qwen2VLForConditionalGeneration

    hf = c.model.hf_config
    hf = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    runtime = {"dtype": dtype or c.model.dtype, "attention_impl": attention or c.model.attention,
               "remat": remat or c.model.get("remat", "none")}
    if c.family == "llava":
        return LlavaForConditionalGeneration(LlavaConfig.from_hf_config(hf, **runtime))
    if c.family == "qwen2_vl":
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_hf_config(hf, **runtime))
    raise ValueError(f"family must be 'llava' or 'qwen2_vl', got {c.family!r}")


def _sds(shape, dtype, sharding=None):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _with_shardings(tree, shardings):
    import jax

    return jax.tree_util.tree_map(lambda x, s: _sds(x.shape, x.dtype, s), tree, shardings)


def image_inputs(model, batch: int, image_size: int | None = None) -> dict:
    """Abstract image inputs: LLaVA pixels [B, C, H, W]; Qwen2-VL one `image_size`² image per row, as
    flattened patches [B · patches, C·t·p·p] with its grid."""
    import jax.numpy as jnp

    cfg = model.config
    if cfg.model_type == "llava":
        v = cfg.vision
        return {"pixel_values": _sds((batch, v.num_channels, v.image_size, v.image_size), jnp.float32)}
    v = cfg.vision
    side = image_size // v.patch_size
    side -= side % v.spatial_merge_size
    return {"pixel_values": _sds((batch * side * side, v.patch_dim), jnp.float32),
            "image_grid_thw": _sds((batch, 3), jnp.int32)}


def image_tokens(model, image_size: int | None = None) -> int:
    cfg = model.config
    if cfg.model_type == "llava":
        return cfg.num_image_tokens
    side = image_size // cfg.vision.patch_size
    side -= side % cfg.vision.spatial_merge_size
    return (side // cfg.vision.spatial_merge_size) ** 2


@dataclasses.dataclass
class ProgramPlan:
    program: str
    shapes: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Live at once on one device: inputs, outputs not written in place of donated inputs, scratch."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def _analyse(name: str, shapes: str, lowered) -> ProgramPlan:
    import time

    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return ProgramPlan(name, shapes, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                       int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes),
                       int(mem.generated_code_size_in_bytes), float((cost or {}).get("flops", float("nan"))),
                       seconds)


def frozen_dtype(c) -> str | None:
    """The dtype stage 1 holds the frozen parameters in: `plan.frozen_dtype` when set (what-if), else the runtime's
    `model.frozen_dtype` (None: f32)."""
    return (c.get("plan") or {}).get("frozen_dtype") or c.model.get("frozen_dtype") or None


def distill_program(c, model, sharder, batch: int | None = None, length: int | None = None):
    """Lowered VL-Eraser distillation train step (LoRA on every block's down_proj behind its vacuum projector)."""
    import jax
    import jax.numpy as jnp

    from ..parallel import abstract_params
    from ..unlearn import lora as lora_lib
    from ..unlearn import trainer as tr
    from ..unlearn import vl_eraser as vle

    v = c.vl_eraser
    p = c.plan
    cfg = vle.VLEraserConfig(rank=v.rank, lora_alpha=v.lora_alpha, lambda_=v.lambda_, ce_mode=v.ce_mode,
                             distill_tokens=v.get("distill_tokens", vle.VLEraserConfig.distill_tokens))
    b = batch or v.batch_size
    t = length or v.max_length
    params = abstract_params(model, sharder, dtype=frozen_dtype(c))
    lora = jax.eval_shape(lambda prm: lora_lib.init(prm, cfg.rank, cfg.lora_alpha, jax.random.PRNGKey(0),
                                                     b_std=cfg.lora_b_std), params)
    trainable, scales = lora_lib.split_trainable(lora)
    text = model.config.text
    rank = p.retained_rank  # at most the number of retain images (mean pooling)
    vacuum = {"llm": {f"layers_{i}": {"mlp": {"down_proj": {"basis": _sds((text.intermediate_size, rank), jnp.float32)}}}
                      for i in range(text.num_hidden_layers)}}
    frozen = {"params": params, "lora_scales": scales, "vacuum": vacuum}
    frozen = _with_shardings(frozen, sharder.tree(frozen))
    tx = tr.make_optimizer(tr.TrainConfig(total_steps=1000, learning_rate=v.learning_rate))
    state = jax.eval_shape(lambda tr_: tr._fresh_state(tr_, tx, 0), trainable)
    state = _with_shardings(state, tr.state_shardings(state, sharder))
    batch_tree = {"input_ids": _sds((b, t), jnp.int32), "attention_mask": _sds((b, t), jnp.int32),
                  "labels": _sds((b, t), jnp.int32), **image_inputs(model, b, p.image_size)}
    if cfg.distill_tokens == "entity":
        batch_tree[vle.ENTITY_MASK] = _sds((b, t), jnp.int32)
    batch_tree = _with_shardings(batch_tree, sharder.batch(batch_tree))
    step = tr.make_train_step(vle.distillation_loss_fn(model, cfg), tx, sharder)
    shapes = f"batch {b} x {t} tokens ({image_tokens(model, p.image_size)} image), LoRA r{cfg.rank}, basis rank {rank}"
    return step.lower(state, frozen, batch_tree), shapes


def generate_program(c, model, sharder, batch: int | None = None, prompt: int | None = None,
                     new_tokens: int | None = None):
    """Lowered generation program (prefill + while_loop decode with a KV cache)."""
    import jax.numpy as jnp

    from ..generate import _sharded_generate
    from ..parallel import abstract_params

    p = c.plan
    b, t, n = batch or p.generate_batch, prompt or p.prompt_length, new_tokens or p.max_new_tokens
    variables = {"params": abstract_params(model, sharder)}
    ids = _sds((b, t), jnp.int32)
    images = image_inputs(model, b, p.image_size)
    fn = _sharded_generate(model, sharder, n, (int(np.ravel(model.config.text.eos_token_id)[0]),), 0, 0.0, 1.0,
                           "added")
    rng = _sds((2,), jnp.uint32)
    lowered = fn.lower(variables, ids, _sds((b, t), jnp.int32), images["pixel_values"],
                       images.get("image_grid_thw"), rng)
    shapes = f"batch {b} x {t} prompt tokens ({image_tokens(model, p.image_size)} image) + {n} new"
    return lowered, shapes


def plan(c, mesh: str, programs=("distill", "generate"), backend: str = "cpu") -> tuple[list[ProgramPlan], dict]:
    from ..parallel import Sharder, make_mesh, mesh_shape, parse_mesh, rules_from_config, DEFAULT_RULES

    from ..models.configs import ConfigError

    try:
        sizes = parse_mesh(mesh)
    except ValueError as e:
        raise ConfigError(f"--mesh {mesh}: {e}") from None
    if -1 in sizes.values():
        raise ConfigError(f"--mesh {mesh}: give every axis size for planning (no -1)")
    n = math.prod(sizes.values())
    try:
        ensure_devices(n, backend)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    import jax

    section = c.get("mesh") or {}
    rules = rules_from_config(section["rules"]) if section.get("rules") else DEFAULT_RULES
    sharder = Sharder(make_mesh(sizes, jax.devices()[:n]), rules)
    attention = c.model.attention
    if jax.default_backend() != "gpu" and attention == "cudnn":
        attention = "xla"  # cuDNN flash attention exists only on NVIDIA GPUs
    model = build_model(c, attention=attention)
    out = []
    if "distill" in programs:
        lowered, shapes = distill_program(c, model, sharder)
        out.append(_analyse("VL-Eraser stage-1 step", shapes, lowered))
    if "generate" in programs:
        lowered, shapes = generate_program(c, model, sharder)
        out.append(_analyse("generation", shapes, lowered))
    params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"])))
    info = {"mesh": mesh_shape(sizes, n), "devices": n, "backend": jax.default_backend(),
            "frozen_dtype": frozen_dtype(c) or "float32",
            "attention": attention, "remat": model.config.remat, "dtype": model.config.dtype,
            "parameters": params}
    return out, info


def format_plan(c, plans: list[ProgramPlan], info: dict, device_memory_gb: float | None) -> str:
    m = info["mesh"]
    lines = [
        f"{c.name}: {info['parameters'] / 1e9:.2f} B parameters (stage 1 holds the frozen ones in "
        f"{info['frozen_dtype']}), compute {info['dtype']}, "
        f"attention {info['attention']}, remat {info['remat']}",
        f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} ({info['devices']} devices, compiled by "
        f"XLA:{info['backend'].upper()}{' on simulated devices' if info['backend'] == 'cpu' else ''})",
        "",
        "per device (GiB)        arguments    outputs   aliased   temporary    peak     TFLOPs  compile",
    ]
    for p in plans:
        fits = ""
        if device_memory_gb:
            fits = "  fits" if p.peak_bytes <= device_memory_gb * 1e9 else "  DOES NOT FIT"
        lines.append(
            f"{p.program:<22} {p.argument_bytes / GIB:>9.2f} {p.output_bytes / GIB:>9.2f} {p.alias_bytes / GIB:>9.2f} "
            f"{p.temp_bytes / GIB:>10.2f} {p.peak_bytes / GIB:>9.2f} {p.flops / 1e12:>9.2f}  {p.compile_seconds:>5.0f}s"
            f"{fits}")
        lines.append(f"  {p.shapes}")
    if device_memory_gb:
        lines.append(f"(device memory {device_memory_gb:g} GB = {device_memory_gb * 1e9 / GIB:.1f} GiB; peak = arguments + "
                     "outputs - aliased + temporary)")
    if info["backend"] == "cpu":
        lines.append("XLA:CPU buffer assignment approximates the accelerator's (it has no native bf16 matmul and keeps "
                     "f32 copies of weights and activations); keep a margin.")
    return "\n".join(lines)


def cmd_plan(args) -> int:
    """The `vleraser plan` subcommand."""
    from ..config import load_config

    c = load_config(args.config, args.overrides)
    programs = tuple(args.program)
    plans, info = plan(c, args.mesh, programs, args.backend)
    memory = args.device_memory
    if memory is None:
        memory = (c.get("plan") or {}).get("device_memory_gb")
    print(format_plan(c, plans, info, memory))
    return 0


def add_parser(sub) -> Any:
    p = sub.add_parser("plan", help="compile the 7B stage-1 step and generation from abstract shapes: per-device "
                                    "memory and FLOPs on a mesh, without weights or accelerators")
    p.add_argument("--config", required=True, help="configs/*.py with model.hf_config and a plan section")
    p.add_argument("--mesh", required=True, help="DATAxFSDPxTENSOR (e.g. 1x1x1, 1x4x2) or data=1,fsdp=4,tensor=2")
    p.add_argument("--device-memory", type=float, default=None, help="GB per device, to say whether it fits")
    p.add_argument("--program", nargs="+", default=["distill", "generate"], choices=["distill", "generate"])
    p.add_argument("--backend", choices=["cpu", "default"], default="cpu",
                   help="cpu: simulate the mesh with CPU devices (default); default: JAX's own devices")
    p.set_defaults(func=cmd_plan)
    return p
