"""The vacuum-space projector (DESIGN §4): where the retain set's image representations are not.

Per LM block l, stream the retain set's FFN keys h at image-token positions, accumulate the uncentered
second moment C = (1/N) Σ h hᵀ in f32 (per image mean-pooled keys by default, or every image token),
eigendecompose it, and keep the eigenvectors whose eigenvalue passes the threshold: U_r spans what the
retain images use. The projector onto the rest (the left null space, the "vacuum") is P = I − U_r U_rᵀ,
stored compactly as {"basis": U_r} when U_r has fewer than F/2 columns, else densely as {"dense": P};
a block whose retain keys pass no threshold gets no entry (P = I).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from .lora import natural_key

POOLINGS = ("mean", "tokens")
THRESHOLD_MODES = ("absolute", "relative", "rank")


def image_token_id(config) -> int:
    for name in ("image_token_index", "image_token_id"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise AttributeError(f"{type(config).__name__} has no image token id")


def _key_moments(model, params, batch: dict, pooling: str = "mean"):
    """One batch's contribution: {block path: (Σ h hᵀ [F, F] f32, N)} over image keys.

    pooling "mean": h is the mean key of each image's tokens (images in reading order, each a contiguous
    block of tokens as the processors lay them out); "tokens": every image-token key counts.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    _, state = model.apply({"params": params}, **inputs, mutable=["intermediates"])
    is_image = (batch["input_ids"] == image_token_id(model.config)).reshape(-1)
    flat = traverse_util.flatten_dict(state["intermediates"])
    out = {}
    for path, value in flat.items():
        if path[-1] != "ffn_key":
            continue
        block = "/".join(path[:-1])
        h = value[0].astype(jnp.float32).reshape(-1, value[0].shape[-1])
        if pooling == "tokens":
            hm = h * is_image[:, None]
            out[block] = (hm.T @ hm, is_image.sum().astype(jnp.float32))
            continue
        # image index of every image token: starts where a run of image tokens begins
        starts = is_image & ~jnp.concatenate([jnp.zeros((1,), bool), is_image[:-1]])
        image_of = jnp.cumsum(starts) - 1
        num_images = inputs["pixel_values"].shape[0] if "image_grid_thw" not in inputs else inputs["image_grid_thw"].shape[0]
        seg = jnp.where(is_image, image_of, num_images)  # non-image tokens fall in a dropped bucket
        sums = jax.ops.segment_sum(h, seg, num_segments=num_images + 1)[:num_images]
        counts = jax.ops.segment_sum(is_image.astype(jnp.float32), seg, num_segments=num_images + 1)[:num_images]
        pooled = sums / jnp.maximum(counts, 1.0)[:, None]
        valid = (counts > 0).astype(jnp.float32)
        pooled = pooled * valid[:, None]
        out[block] = (pooled.T @ pooled, valid.sum())
    return out


key_moments = jax.jit(_key_moments, static_argnames=("model", "pooling"))


def _moment_shardings(sharding, moments):
    """Σ h hᵀ [F, F] split over its first axis like the FFN width; counts replicated."""
    return {block: (sharding.sharding(("mlp", None), s.shape), sharding.replicated) for block, (s, _) in moments.items()}


def sharded_key_moments(model, sharding, pooling: str = "mean"):
    """`key_moments` as a jit with explicit shardings: params by the parameter rules, the batch over
    `batch`, each block's [F, F] sum split over the FFN width."""

    def out_shardings(params, batch):
        abstract = jax.eval_shape(lambda p, b: _key_moments(model, p, b, pooling), params, batch)
        return _moment_shardings(sharding, abstract)

    return sharding.jit(lambda p, b: _key_moments(model, p, b, pooling),
                        lambda p, b: (sharding.tree(p), sharding.batch(b)), out_shardings)


def collect_moments(model, params, batches: Iterable[dict], pooling: str = "mean", progress: bool = True,
                    sharding=None):
    """Stream batches (each with image inputs) -> ({block: C = E[h hᵀ] as float64 numpy}, N vectors).

    sharding: a `parallel.Sharder`; the sums then stay on the devices, split over the FFN width and
    accumulated in f32 (a 7B model's 32 blocks of 11008² would be 15 GB on one host), and C comes back as
    sharded f32 arrays, which `build_vacuum_projectors` accepts as they are.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if sharding is not None:
        return _collect_sharded(model, params, batches, pooling, progress, sharding)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, float] = {}
    for batch in tqdm(batches, desc="retain image keys", unit="batch", disable=not progress, leave=False):
        for block, (s, n) in jax.device_get(key_moments(model, params, batch, pooling)).items():
            sums[block] = sums.get(block, 0.0) + np.asarray(s, np.float64)
            counts[block] = counts.get(block, 0.0) + float(n)
    if not sums or min(counts.values()) == 0:
        raise ValueError("no image tokens in the retain batches: cannot build the vacuum projector")
    return {block: sums[block] / counts[block] for block in sums}, int(min(counts.values()))


def _collect_sharded(model, params, batches, pooling, progress, sharding):
    step = sharded_key_moments(model, sharding, pooling)
    add = None
    total = None
    for batch in tqdm(batches, desc="retain image keys", unit="batch", disable=not progress, leave=False):
        out = step(params, batch)
        if total is None:
            total = out
            shardings = _moment_shardings(sharding, out)
            add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b), in_shardings=(shardings, shardings),
                          out_shardings=shardings, donate_argnums=(0,))
        else:
            total = add(total, out)
    if total is None:
        raise ValueError("no image tokens in the retain batches: cannot build the vacuum projector")
    counts = {block: float(n) for block, (_, n) in total.items()}
    if min(counts.values()) == 0:
        raise ValueError("no image tokens in the retain batches: cannot build the vacuum projector")
    divide = jax.jit(lambda s, n: s / n)
    return {block: divide(s, n) for block, (s, n) in total.items()}, int(min(counts.values()))


@dataclasses.dataclass(frozen=True)
class LayerReport:
    block: str
    retained_rank: int
    null_dim: int
    top_eigenvalue: float
    threshold: float
    stored: str  # "basis", "dense" or "identity" (nothing retained)
    bytes: int


def vacuum_projector_from_moment(c: np.ndarray, threshold: float = 2e-2, mode: str = "absolute", rank: int | None = None,
                          dtype=np.float32) -> tuple[dict, dict]:
    """{"basis": U_r} or {"dense": P} from one block's second moment, plus its report fields."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    eigvals, eigvecs = jnp.linalg.eigh(jnp.asarray(c, jnp.float32))  # ascending
    eigvals, eigvecs = np.asarray(eigvals, np.float64), np.asarray(eigvecs)
    f = c.shape[0]
    if mode == "absolute":
        keep = eigvals >= threshold
        cut = threshold
    elif mode == "relative":
        cut = threshold * eigvals[-1]
        keep = eigvals >= cut
    else:
        if rank is None or not 0 <= rank <= f:
            raise ValueError(f"threshold mode 'rank' needs 0 <= rank <= {f}, got {rank}")
        keep = np.zeros(f, bool)
        keep[f - rank:] = True
        cut = float(eigvals[f - rank]) if rank else float("inf")
    basis = eigvecs[:, keep].astype(dtype)
    k = basis.shape[1]
    if k == 0:  # nothing retained: P = I, i.e. no projector entry at all
        projector, stored = {}, "identity"
    elif k < f / 2:
        projector, stored = {"basis": jnp.asarray(basis)}, "basis"
    else:
        projector, stored = {"dense": jnp.asarray(np.eye(f, dtype=dtype) - basis @ basis.T)}, "dense"
    nbytes = int(sum(np.asarray(v).nbytes for v in projector.values()))
    info = {"retained_rank": k, "null_dim": f - k, "top_eigenvalue": float(eigvals[-1]), "threshold": float(cut),
            "stored": stored, "bytes": nbytes}
    return projector, info


def build_vacuum_projectors(moments: dict, threshold: float = 2e-2, mode: str = "absolute", rank: int | None = None,
                     target: str = "down_proj") -> tuple[dict, list[LayerReport]]:
    """Vacuum projector tree for the "vacuum" collection ({block}/{target}/basis|dense) and a per-layer report."""
    flat, report = {}, []
    for block in sorted(moments, key=natural_key):
        projector, info = vacuum_projector_from_moment(moments[block], threshold, mode, rank)
        for name, value in projector.items():
            flat[tuple(block.split("/")) + (target, name)] = value
        report.append(LayerReport(block=block, **info))
    return traverse_util.unflatten_dict(flat), report


def format_report(report: list[LayerReport]) -> str:
    lines = ["block              retained  null   top eig     threshold   stored  bytes"]
    for r in report:
        lines.append(f"{r.block:<18} {r.retained_rank:>8} {r.null_dim:>5}  {r.top_eigenvalue:>9.3g}  {r.threshold:>10.3g}  "
                     f"{r.stored:<6} {r.bytes:>7}")
    return "\n".join(lines)
