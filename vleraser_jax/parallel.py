"""Scale-out (DESIGN §6): one device mesh, logical axis names on every parameter, explicitly sharded jit.

JAX's own SPMD is the engine: a `jax.sharding.Mesh` with axes (`data`, `fsdp`, `tensor`), `NamedSharding`s
derived from logical axis names, and `jax.jit` with explicit in/out shardings (GSPMD inserts the
collectives). Nothing here orchestrates processes; multi-host runs call `initialize_distributed()` first and
then run the same program on every host.

Two rule tables, both plain data that a config may replace:

- `PARAM_AXES`: regex on the '/'-joined path of a leaf -> logical axis names, one per dimension. The model
  code and the HF name tables stay unchanged; a path that no rule covers is an error, so a new parameter
  cannot silently end up replicated. LoRA factors (`.../a`, `.../b`) and vacuum projectors
  (`.../basis`, `.../dense`) inherit the axes of the kernel they sit on. Paths are matched by suffix, so the
  same rules cover `params/...`, `lora/...`, an optimizer state's `mu/...` and a train state's `trainable/...`.
- `DEFAULT_RULES`: logical name -> mesh axis (or axes, or None = replicated), MaxText style.

A dimension that its mesh axes do not divide stays replicated over the axes that do not fit (e.g. a
101-token toy vocabulary on a 2-way tensor axis); real 7B shapes divide the meshes we document.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch over data x fsdp (fsdp shards weights *and* the batch, ZeRO-3 style);
# model width over fsdp; heads / FFN width / vocabulary over tensor (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("positions", None),
    ("patch", None),
    ("conv", None),
    ("lora_rank", None),
    ("basis", None),
    ("head_dim", None),
)

_ATTN = r"(self_attn|attn)"
# Path regex (searched, anchored at the end) -> logical axes. Kernels are [in, out] (nn.Dense layout).
PARAM_AXES: tuple[tuple[str, tuple], ...] = (
    # --- language model (Llama / Qwen2 decoder)
    (r"(^|/)embed_tokens/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (rf"(^|/){_ATTN}/q_proj/kernel$", ("embed", "heads")),
    (rf"(^|/){_ATTN}/q_proj/bias$", ("heads",)),
    (r"(^|/)llm/layers_\d+/self_attn/[kv]_proj/kernel$", ("embed", "kv_heads")),
    (r"(^|/)llm/layers_\d+/self_attn/[kv]_proj/bias$", ("kv_heads",)),
    (rf"(^|/){_ATTN}/[kv]_proj/kernel$", ("embed", "heads")),  # CLIP: no grouped heads
    (rf"(^|/){_ATTN}/[kv]_proj/bias$", ("heads",)),
    (rf"(^|/){_ATTN}/(o_proj|out_proj|proj)/kernel$", ("heads", "embed")),
    (rf"(^|/){_ATTN}/(o_proj|out_proj|proj)/bias$", ("embed",)),
    (rf"(^|/){_ATTN}/qkv/kernel$", ("embed", "heads")),  # Qwen2-VL vision: fused q|k|v
    (rf"(^|/){_ATTN}/qkv/bias$", ("heads",)),
    (r"(^|/)mlp/(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"(^|/)mlp/(gate_proj|up_proj)/bias$", ("mlp",)),
    (r"(^|/)mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"(^|/)mlp/down_proj/bias$", ("embed",)),
    # --- vision towers and projector: FFN in, FFN out
    (r"(^|/)(fc1|mlp_0|linear_1)/kernel$", ("embed", "mlp")),
    (r"(^|/)(fc1|mlp_0|linear_1)/bias$", ("mlp",)),
    (r"(^|/)(fc2|mlp_2|linear_2)/kernel$", ("mlp", "embed")),
    (r"(^|/)(fc2|mlp_2|linear_2)/bias$", ("embed",)),
    (r"(^|/)patch_embedding/kernel$", ("conv", "conv", "conv", "embed")),  # CLIP Conv2d [kh, kw, in, out]
    (r"(^|/)patch_embed/proj/kernel$", ("patch", "embed")),  # Qwen2-VL Conv3d as a matmul
    (r"(^|/)position_embedding/embedding$", ("positions", "embed")),
    (r"(^|/)class_embedding$", ("embed",)),
    # --- every norm (RMSNorm scale, LayerNorm scale/bias)
    (r"(^|/)(input_layernorm|post_attention_layernorm|norm|norm1|norm2|layer_norm1|layer_norm2"
     r"|pre_layrnorm|post_layernorm|ln_q)/(scale|bias)$", ("norm",)),
)

_LORA_LEAVES = {"a": 0, "b": 1}  # which kernel dimension a LoRA factor keeps: a = Aᵀ [in, R], b = Bᵀ [R, out]
_PROJECTOR_LEAVES = ("basis", "dense")  # [in, U] / [in, in]: sharded like the kernel's input


class ShardingRuleError(ValueError):
    """A leaf no rule covers, or a rule that does not fit the leaf."""


# ------------------------------------------------------------------ the mesh


def parse_mesh(spec: str | Mapping[str, int] | Sequence[int] | None) -> dict[str, int]:
    """{"data": d, "fsdp": f, "tensor": t} from "2x2x2", "data=2,fsdp=4", a mapping or a sequence.

    Missing axes are 1; at most one size may be -1 (filled from the device count by `mesh_shape`).
    """
    if spec is None:
        return {"data": -1, "fsdp": 1, "tensor": 1}
    if isinstance(spec, str):
        text = spec.strip()
        if "=" in text:
            sizes = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                name, _, value = part.partition("=")
                sizes[name.strip()] = int(value)
        else:
            parts = text.lower().split("x")
            if len(parts) != len(MESH_AXES):
                raise ValueError(f"mesh {spec!r}: expected DATAxFSDPxTENSOR, e.g. 1x4x2")
            sizes = dict(zip(MESH_AXES, (int(v) for v in parts)))
    elif isinstance(spec, Mapping) or hasattr(spec, "items"):
        sizes = {k: int(v) for k, v in spec.items() if k != "rules"}
    else:
        sizes = dict(zip(MESH_AXES, (int(v) for v in spec)))
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes must be {MESH_AXES}; unknown {sorted(unknown)}")
    sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
    if sum(v == -1 for v in sizes.values()) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh {sizes}: sizes must be positive, with at most one -1")
    return sizes


def mesh_shape(spec, num_devices: int) -> dict[str, int]:
    """Sizes with the -1 axis filled so the mesh uses exactly `num_devices` devices."""
    sizes = parse_mesh(spec)
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if num_devices % fixed:
            raise ValueError(f"mesh {sizes}: {num_devices} devices are not a multiple of {fixed}")
        sizes = {a: (num_devices // fixed if v == -1 else v) for a, v in sizes.items()}
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; {num_devices} are available")
    return sizes


def make_mesh(spec=None, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    Axes are `AxisType.Auto` (GSPMD propagation inside jit; shardings are given at the jit boundary).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
    """Normalise config rules ((logical, mesh axis | [axes] | None), ...) into hashable tuples."""
    out = []
    for item in rules:
        name, axes = item
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


# ------------------------------------------------------------------ paths and logical axes


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_string(key_path) -> str:
    """'/'-joined names of a `tree_flatten_with_path` key path (dict keys, attributes, indices)."""
    return "/".join(_key_name(k) for k in key_path)


def _lookup(path: str, param_axes) -> tuple | None:
    for pattern, axes in param_axes:
        if re.search(pattern, path):
            return tuple(axes)
    return None


def logical_axes(path: str, ndim: int, param_axes=PARAM_AXES) -> tuple:
    """The logical axis names of the leaf at `path` (rank `ndim`); raises ShardingRuleError if uncovered."""
    if ndim == 0:
        return ()
    parent, _, leaf = path.rpartition("/")
    if leaf in _LORA_LEAVES or leaf in _PROJECTOR_LEAVES:
        kernel = _lookup(f"{parent}/kernel", param_axes)
        if kernel is not None and len(kernel) == 2 and ndim == 2:
            if leaf == "a":
                return (kernel[0], "lora_rank")
            if leaf == "b":
                return ("lora_rank", kernel[1])
            return (kernel[0], "basis" if leaf == "basis" else None)
    axes = _lookup(path, param_axes)
    if axes is None:
        raise ShardingRuleError(f"no sharding rule covers {path!r} (rank {ndim}); add one to PARAM_AXES")
    if len(axes) != ndim:
        raise ShardingRuleError(f"{path!r} has rank {ndim} but its rule gives {len(axes)} axes {axes}")
    return axes


def tree_logical_axes(tree, param_axes=PARAM_AXES):
    """A tree of logical-axis tuples with `tree`'s structure (leaves: arrays or ShapeDtypeStructs)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [logical_axes(path_string(p), len(np.shape(x)), param_axes) for p, x in flat]
    )


# ------------------------------------------------------------------ the sharder


@dataclasses.dataclass(frozen=True, eq=False)
class Sharder:
    """A mesh plus the two rule tables: turns trees into `NamedSharding` trees and places values on them."""

    mesh: Mesh
    rules: tuple = DEFAULT_RULES
    param_axes: tuple = PARAM_AXES

    @classmethod
    def from_config(cls, c, devices=None) -> "Sharder":
        """From a config's `mesh` section: data/fsdp/tensor sizes and optional `rules` (logical -> mesh)."""
        section = c.get("mesh") if hasattr(c, "get") else None
        section = section or {}
        sizes = {a: section.get(a, -1 if a == "data" else 1) for a in MESH_AXES}
        rules = rules_from_config(section.get("rules")) if section.get("rules") else DEFAULT_RULES
        return cls(make_mesh(sizes, devices), rules)

    # --- logical -> physical
    def spec(self, logical: Sequence, shape: Sequence[int]) -> P:
        table = dict(self.rules)
        used: set[str] = set()
        out = []
        for name, dim in zip(logical, shape):
            if name is None:
                out.append(None)
                continue
            if name not in table:
                raise ShardingRuleError(f"logical axis {name!r} has no mesh rule; known: {sorted(table)}")
            axes = table[name]
            axes = [] if axes is None else [axes] if isinstance(axes, str) else list(axes)
            axes = [a for a in axes if a not in used and self.mesh.shape[a] > 1]
            while axes and dim % math.prod(self.mesh.shape[a] for a in axes):
                axes.pop()  # does not divide: keep the leading axes that do
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        return P(*out)

    def sharding(self, logical: Sequence, shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    # --- trees
    def tree(self, tree):
        """Shardings for a tree of parameters (or anything holding them: LoRA, projectors, optimizer state)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return jax.tree_util.tree_unflatten(treedef, [
            self.sharding(logical_axes(path_string(p), len(np.shape(x)), self.param_axes), np.shape(x))
            for p, x in flat
        ])

    def batch(self, tree):
        """Shardings for a data batch: the leading (example / image / patch) axis over `batch`."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        out = []
        for p, x in flat:
            shape = np.shape(x)
            if len(shape) == 3 and path_string(p).endswith("position_ids"):  # M-RoPE [3, B, T]
                logical = (None, "batch", None)
            else:
                logical = ("batch",) + (None,) * (len(shape) - 1) if shape else ()
            out.append(self.sharding(logical, shape))
        return jax.tree_util.tree_unflatten(treedef, out)

    def put(self, tree, shardings):
        """Place `tree` on `shardings`. Host (numpy) values are the *global* value, identical on every
        process; each process copies only the slices its own devices hold."""

        def place(x, s):
            if x is None:
                return None
            if isinstance(x, jax.Array):
                if x.sharding == s:
                    return x
                if x.is_fully_addressable and not s.is_fully_addressable:
                    x = np.asarray(x)  # a process-local value onto a multi-process sharding: copy own slices
                else:
                    return jax.device_put(x, s)
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

        return jax.tree_util.tree_map(place, tree, shardings)

    def jit(self, fn: Callable, in_shardings: Callable, out_shardings, donate_argnums=()) -> "ShardedFunction":
        return ShardedFunction(fn, self, in_shardings, out_shardings, tuple(donate_argnums))


class ShardedFunction:
    """`jax.jit(fn, in_shardings=..., out_shardings=..., donate_argnums=...)` whose shardings are computed
    from the arguments' tree structure (batches of different kinds, LoRA or not) and cached per structure.

    in_shardings(*args) -> a tuple with one sharding tree per argument; out_shardings: a sharding tree
    (prefix) or a callable of the arguments. Calls place host arguments on their shardings first.
    """

    def __init__(self, fn, sharder: Sharder, in_shardings, out_shardings, donate_argnums=()):
        self.fn, self.sharder = fn, sharder
        self._in, self._out, self._donate = in_shardings, out_shardings, donate_argnums
        self._cache: dict = {}

    def _compiled(self, args):
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves))
        if key not in self._cache:
            in_sh = tuple(self._in(*args))
            out_sh = self._out(*args) if callable(self._out) else self._out
            self._cache[key] = (jax.jit(self.fn, in_shardings=in_sh, out_shardings=out_sh,
                                        donate_argnums=self._donate), in_sh)
        return self._cache[key]

    def __call__(self, *args):
        jitted, in_sh = self._compiled(args)
        return jitted(*self.sharder.put(args, in_sh))

    def lower(self, *args):
        """Lower without running (arguments may be `jax.ShapeDtypeStruct`s): `.compile()` gives the
        per-device `memory_analysis()` and `cost_analysis()`."""
        jitted, _ = self._compiled(args)
        return jitted.lower(*args)


# ------------------------------------------------------------------ parameters: init, placement


def init_params(model, rng, sharder: Sharder):
    """Random parameters created directly in their shards (jit with out_shardings): no host copy of the
    whole model ever exists."""
    inputs = model.dummy_inputs()
    init = lambda key: model.init(key, **inputs)["params"]
    abstract = jax.eval_shape(init, rng)
    return jax.jit(init, out_shardings=sharder.tree(abstract))(rng)


def abstract_params(model, sharder: Sharder | None = None, dtype=None):
    """ShapeDtypeStructs (with shardings when a sharder is given) of the model's parameters; no memory."""
    inputs = model.dummy_inputs()
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs)["params"])
    if dtype is not None:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), abstract)
    if sharder is None:
        return abstract
    shardings = sharder.tree(abstract)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def shard_params(params, sharder: Sharder):
    """Existing parameters (or LoRA / projector trees) moved onto their shardings."""
    return sharder.put(params, sharder.tree(params))


def sharder_for(c) -> "Sharder | None":
    """The pipeline's mesh: a `Sharder` when the config has a `mesh` section, else None (plain single-device jit)."""
    section = c.get("mesh") if hasattr(c, "get") else None
    return Sharder.from_config(c) if section else None


# ------------------------------------------------------------------ steps that live nowhere else


def make_forward(model, sharder: Sharder, lora_mode: str = "added") -> ShardedFunction:
    """Evaluation forward pass: (variables, batch) -> logits [B, T, V], sharded over batch and vocabulary.

    variables: {"params", optional "lora", "vacuum"} (or bare params); batch: the processor's arrays.
    """

    def forward(variables, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model.apply(variables, **inputs, lora_mode=lora_mode).logits

    def in_shardings(variables, batch):
        return sharder.tree(variables), sharder.batch(batch)

    def out_shardings(variables, batch):
        b, t = np.shape(batch["input_ids"])
        vocab = model.config.text.vocab_size
        return sharder.sharding(("batch", "length", "vocab"), (b, t, vocab))

    return _ForwardWrapper(sharder.jit(forward, in_shardings, out_shardings))


class _ForwardWrapper:
    """Accepts bare params as well as a variables dict."""

    def __init__(self, fn: ShardedFunction):
        self.fn = fn

    @staticmethod
    def _variables(v):
        return v if "params" in v else {"params": v}

    def __call__(self, variables, batch):
        return self.fn(self._variables(variables), batch)

    def lower(self, variables, batch):
        return self.fn.lower(self._variables(variables), batch)


# ------------------------------------------------------------------ multi-host


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """`jax.distributed.initialize()` when launched as one process of a multi-process job; else nothing.

    Our launch scripts set VLERASER_DISTRIBUTED=1. With VLERASER_COORDINATOR / VLERASER_NUM_PROCESSES /
    VLERASER_PROCESS_ID (launch/local.sh) those are passed explicitly; otherwise JAX detects the cluster
    itself (TPU pod slices, SLURM). Must run before anything touches a device. Returns whether it did.
    """
    env = os.environ if env is None else env
    if env.get("VLERASER_DISTRIBUTED", "").lower() not in ("1", "true", "yes"):
        return False
    kwargs = {}
    if env.get("VLERASER_COORDINATOR"):
        kwargs = {"coordinator_address": env["VLERASER_COORDINATOR"],
                  "num_processes": int(env["VLERASER_NUM_PROCESSES"]),
                  "process_id": int(env["VLERASER_PROCESS_ID"])}
    jax.distributed.initialize(**kwargs)
    return True


# ------------------------------------------------------------------ a cluster smoke test


def selfcheck(mesh_spec=None) -> dict:
    """A tiny random LLaVA, initialised sharded on the global mesh, one sharded forward pass; returns a
    checksum of the logits that is the same on every process and equal to a single-process run's."""
    from .models.configs import CLIPVisionConfig, LlavaConfig, TextConfig
    from .models.llava import LlavaForConditionalGeneration

    text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=7)
    model = LlavaForConditionalGeneration(LlavaConfig(vision=vision, text=text, image_token_index=120,
                                                      image_seq_length=16))
    sharder = Sharder(make_mesh(mesh_spec))
    params = init_params(model, jax.random.PRNGKey(0), sharder)
    rng = np.random.default_rng(0)  # the same global batch on every process
    ids = rng.integers(3, 110, (8, 24)).astype(np.int32)
    ids[:, 2:18] = 120
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "pixel_values": rng.standard_normal((8, 3, 28, 28)).astype(np.float32)}
    logits = make_forward(model, sharder)(params, batch)
    total = jax.jit(lambda x: jnp.sum(jnp.abs(x.astype(jnp.float32))), out_shardings=sharder.replicated)(logits)
    return {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "mesh": dict(sharder.mesh.shape),
            "logits_sharding": str(logits.sharding.spec), "checksum": float(total)}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="multi-host smoke test: one sharded forward pass on the global mesh")
    parser.add_argument("--mesh", default=None, help="DATAxFSDPxTENSOR (default: data over every device)")
    args = parser.parse_args()
    initialize_distributed()
    # one write() of the whole line: processes share the pipe, and writes under PIPE_BUF never interleave
    sys.stdout.write(json.dumps(selfcheck(args.mesh)) + "\n")
    sys.stdout.flush()
