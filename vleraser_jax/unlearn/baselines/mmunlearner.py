"""MMUnlearner's pieces: the diagonal Fisher on D_f and D_r, the saliency mask, and the clipped-then-masked
gradient of its forget steps."""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from .. import lora as lora_lib
from .. import trainer as tr
from ..adapter import model_inputs
from .config import FISHER_SETS


def select_modules(params, module_pattern: str) -> tuple[dict, dict]:
    """(params of the modules whose '/'-joined path matches `module_pattern`, the rest). Unlike
    `trainer.partition` the regex sees the module path (`.../mlp/down_proj`), not the parameter's."""
    regex = re.compile(module_pattern)
    flat = traverse_util.flatten_dict(params)
    chosen = {k: v for k, v in flat.items() if regex.search("/".join(k[:-1]))}
    if not chosen:
        raise ValueError(f"module pattern {module_pattern!r} matches no parameter")
    rest = {k: v for k, v in flat.items() if k not in chosen}
    return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def apply_mask(grads, mask):
    """`grads` with every leaf the mask covers multiplied by it (zero where unselected); other leaves as they are."""
    flat_mask = traverse_util.flatten_dict(mask)
    flat = traverse_util.flatten_dict(grads)
    return traverse_util.unflatten_dict(
        {k: (jnp.where(flat_mask[k], v, jnp.zeros_like(v)) if k in flat_mask else v) for k, v in flat.items()})


def clip_then_mask(max_grad_norm: float | None):
    """The trainer's `gradient_fn` for MMUnlearner, in its reference's order (MLLMU_manifold.py): every step's
    gradient is clipped to `max_grad_norm` over all trainable weights, and a forget step's is then masked
    (`frozen["mask"]`) — so the mask never raises the clipping scale."""

    def gradient_fn(grads, frozen, batch):
        if max_grad_norm:
            norm = optax.tree.norm(grads)
            grads = jax.tree_util.tree_map(lambda g: g * jnp.minimum(1.0, max_grad_norm / (norm + 1e-6)), grads)
        if "forget" in batch:  # static: forget and retain steps are separate programs
            grads = apply_mask(grads, frozen["mask"])
        return grads

    return gradient_fn


# ------------------------------------------------------------------ MMUnlearner: Fisher and mask


def fisher_diagonals(model, params, batch_sets: Sequence[Sequence[dict]],
                     module_pattern: str = lora_lib.LM_LINEARS, sharding=None) -> list[dict]:
    """For each list of batches: the mean over its batches of the squared gradient of the batch's token-mean
    NLL, for the parameters of the modules matching `module_pattern` (SFRon.py's `Mask_Our`:
    Σ_b g_b² / n_batches; the sign of its −loss does not matter). f32 trees. One compiled program per
    batch shape, shared by the sets. sharding: a `parallel.Sharder` (the sums are laid out like the
    parameters and donated from step to step)."""
    selected, rest = select_modules(params, module_pattern)

    def accumulate_fn(acc, sel, rest, batch):  # parameters as arguments: never baked in as constants
        def nll(s):
            logits = model.apply({"params": tr.merge(s, rest)}, **model_inputs(batch)).logits
            return tr.causal_lm_loss(logits, batch["labels"])

        g = jax.grad(nll)(sel)
        return jax.tree_util.tree_map(lambda a, x: a + jnp.square(x.astype(jnp.float32)), acc, g)

    if sharding is None:
        accumulate = jax.jit(accumulate_fn)
    else:
        accumulate = sharding.jit(
            accumulate_fn,
            lambda acc, sel, rest, batch: (sharding.tree(acc), sharding.tree(sel), sharding.tree(rest),
                                           sharding.batch(batch)),
            lambda acc, sel, rest, batch: sharding.tree(acc),
            donate_argnums=(0,),
        )

    out = []
    for batches in batch_sets:
        if not batches:
            raise ValueError("fisher_diagonals: a set has no batches")
        shapes = [x.shape for x in jax.tree_util.tree_leaves(selected)]
        zeros = lambda: jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(selected), [jnp.zeros(shape, jnp.float32) for shape in shapes])
        # sharded: each device creates only its own shard of the sums
        acc = zeros() if sharding is None else jax.jit(zeros, out_shardings=sharding.tree(selected))()
        for batch in batches:
            acc = accumulate(acc, selected, rest, batch)
        out.append(jax.tree_util.tree_map(lambda a, n=len(batches): a / n, acc))
    return out


def saliency_mask(fisher_forget, fisher_retain, threshold: float = 1.0, eps: float = 1e-15):
    """M = [(F_f + ε) / (F_r + ε) ≥ threshold] per weight, as SFRon.py. ε keeps F_r = 0 finite: the ratio is then
    (F_f + ε)/ε ≥ 1, so at threshold 1 such a weight is always selected (F_f = F_r = 0 included)."""
    return jax.tree_util.tree_map(lambda f, r: (f + eps) / (r + eps) >= threshold, fisher_forget, fisher_retain)


def mask_report(mask) -> dict:
    """Selected fraction per module and overall."""
    per = {"/".join(k): float(np.mean(np.asarray(v))) for k, v in traverse_util.flatten_dict(mask).items()}
    total = sum(int(np.asarray(v).size) for v in jax.tree_util.tree_leaves(mask))
    chosen = sum(int(np.asarray(v).sum()) for v in jax.tree_util.tree_leaves(mask))
    return {"selected_fraction": chosen / max(total, 1), "selected": chosen, "total": total, "per_parameter": per}


def fisher_rows(forget_rows, retain_rows, full_rows, mode: str = "retain"):
    """(D_f rows, D_r rows) for the Fisher. "retain": the training splits; "mmunlearner": MLLMU_gen_mask.py's
    language mask, image rows of D_f against image rows of D_r plus every person's text-only rows."""
    if mode == "retain":
        return list(forget_rows), list(retain_rows)
    if mode == "mmunlearner":
        forget = [r for r in forget_rows if r.image is not None]
        if not forget:
            raise ValueError("MMUnlearner's preserve sets (fisher_sets='mmunlearner') need image-grounded forget "
                             "rows and the forget set has none; use fisher_sets='retain'")
        return forget, [r for r in retain_rows if r.image is not None] + [r for r in full_rows if r.image is None]
    raise ValueError(f"fisher_sets must be one of {FISHER_SETS}, got {mode!r}")
