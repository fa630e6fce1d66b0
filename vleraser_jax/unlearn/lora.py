"""Functional LoRA: a separate pytree mirroring the parameter paths it adapts.

Entry for a Dense at path `.../down_proj`: {"a": Aᵀ [F, R], "b": Bᵀ [R, D], "scale": α/R}, consumed by
`models.layers.Dense` from the "lora" variable collection:

    model.apply({"params": params, "lora": lora, "vacuum": projectors}, **inputs)

`merge` folds a LoRA (optionally behind vacuum projectors) into the kernels; VL-Eraser's deletion is
`merge` with a negative sign (see `vl_eraser.delete`).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from ..models.layers import vacuum_project

DOWN_PROJ = r"^llm/layers_(\d+)/mlp/down_proj$"  # VL-Eraser's default: every LM block's FFN output matrix
LM_LINEARS = r"^llm/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)$"  # every LM linear
# What MLLMU-Bench's baselines adapt: `find_all_linear_names` collects the *base names* of every linear outside
# `multi_modal_projector` / `vision_model` (q/k/v/o/gate/up/down_proj) and PEFT matches target_modules by name
# suffix, so CLIP's attention q/k/v_proj get a LoRA too (the projector does not). Qwen2-VL, which its code does
# not cover, gets the same: every LM linear and its ViT's attention qkv.
MLLMU_PEFT_TARGETS = (r"^(llm/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)"
                      r"|vision/layers_\d+/self_attn/[qkv]_proj|vision/blocks_\d+/attn/qkv)$")


def natural_key(path: str) -> list:
    """Sort key that orders `layers_2` before `layers_10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def target_paths(params, pattern: str = DOWN_PROJ, layers: range | list[int] | None = None) -> list[str]:
    """'/'-joined paths of the Dense modules (parents of a `kernel`) matched by `pattern`.

    layers: keep only modules whose first captured group (the block number) is in it.
    """
    regex = re.compile(pattern)
    found = []
    for path in traverse_util.flatten_dict(params):
        if path[-1] != "kernel":
            continue
        module = "/".join(path[:-1])
        m = regex.search(module)
        if not m:
            continue
        if layers is not None and (not m.groups() or int(m.group(1)) not in set(layers)):
            continue
        found.append(module)
    if not found:
        raise ValueError(f"LoRA target pattern {pattern!r} (layers={layers}) matches no Dense kernel")
    return sorted(found, key=natural_key)


def init(params, rank: int, alpha: float, rng, pattern: str = DOWN_PROJ, layers=None, *, a_std: float | None = None,
         b_std: float = 0.0) -> dict:
    """A LoRA tree for every targeted Dense: a ~ N(0, a_std²), b ~ N(0, b_std²) (b_std 0: the classic B = 0 start).

    a_std None: 1/sqrt(F), F the layer's input width (VL-Eraser); PEFT's `init_lora_weights="gaussian"`, which the
    baselines use, is a_std = 1/rank with b = 0. scale = alpha / rank.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    flat_params = traverse_util.flatten_dict(params)
    paths = target_paths(params, pattern, layers)
    keys = jax.random.split(rng, 2 * len(paths))
    flat = {}
    for i, module in enumerate(paths):
        f, d = flat_params[tuple(module.split("/")) + ("kernel",)].shape
        prefix = tuple(module.split("/"))
        a = jax.random.normal(keys[2 * i], (f, rank), jnp.float32)
        flat[prefix + ("a",)] = a / jnp.sqrt(f) if a_std is None else a * a_std
        flat[prefix + ("b",)] = b_std * jax.random.normal(keys[2 * i + 1], (rank, d), jnp.float32)
        flat[prefix + ("scale",)] = jnp.asarray(alpha / rank, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def entries(tree) -> dict[str, dict]:
    """module path -> its LoRA (or projector) entry."""
    out: dict[str, dict] = {}
    for path, value in traverse_util.flatten_dict(tree).items():
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = value
    return out


def split_trainable(lora) -> tuple[dict, dict]:
    """(the a/b matrices to train, the fixed scales)."""
    flat = traverse_util.flatten_dict(lora)
    train = {k: v for k, v in flat.items() if k[-1] in ("a", "b")}
    fixed = {k: v for k, v in flat.items() if k[-1] not in ("a", "b")}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(fixed)


def delta_kernel(entry: dict, projector: dict | None = None):
    """scale · (B A P)ᵀ = scale · P a b, in the kernel's stored [F, D] layout (P is symmetric)."""
    a = entry["a"]
    if projector is not None:
        a = vacuum_project(a.T, projector).T  # P a, column by column
    return entry["scale"] * a @ entry["b"]


def merge(params, lora, projectors=None, sign: float = 1.0):
    """Params with every LoRA folded in: W <- W + sign · scale · P a b. Pure: inputs are untouched."""
    flat = traverse_util.flatten_dict(params)
    proj = entries(projectors) if projectors is not None else {}
    new = dict(flat)
    for module, entry in entries(lora).items():
        key = tuple(module.split("/")) + ("kernel",)
        if key not in flat:
            raise KeyError(f"LoRA entry {module!r} has no kernel in the parameters")
        kernel = flat[key]
        # in f32, rounded once: a bf16 kernel must not round the sum step by step
        new[key] = (kernel.astype(jnp.float32) + sign * delta_kernel(entry, proj.get(module)).astype(jnp.float32)
                    ).astype(kernel.dtype)
    return traverse_util.unflatten_dict(new)
