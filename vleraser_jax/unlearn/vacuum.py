"""The vacuum-space projector (DESIGN §4): the FFN key directions the retain set does not use.

Per LM block l, run the frozen model over retain inputs and take the FFN keys h at the positions a batch's
`vacuum_mask` marks (default: the image tokens): every such token (`pooling="tokens"`, the default) or each
row's mean (`pooling="mean"`, the paper's pooled image representations). The retained basis U_r spans the
directions the retain keys use; the projector onto the rest (the "vacuum") is P = I − U_r U_rᵀ, stored as
{"basis": U_r} when U_r has fewer than F/2 columns, else as {"dense": P}; a block that retains nothing gets
no entry (P = I).

Decomposition (`decomposition="svd"`, the default): `jnp.linalg.svd` of the stacked keys H [N, F] in f32
while they fit in `stack_limit_bytes` (the singular values of H, not the eigenvalues of HᵀH: the condition
number is not squared where the null space is decided), else of the second moment C = HᵀH / N accumulated in
f64 on the host (f32 on the devices when sharded) and decomposed in f32. `decomposition="eigh"` runs
`jnp.linalg.eigh` on C in f32. Every threshold is capped at the numerical rank (singular values below
s_max · max(N, F) · ε_f32): directions the retain keys do not span are never "retained".
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from .adapter import model_inputs
from .lora import natural_key

POOLINGS = ("tokens", "mean")
THRESHOLD_MODES = ("energy", "relative", "absolute", "rank")
DECOMPOSITIONS = ("svd", "eigh")
MASK_KEY = "vacuum_mask"  # [B, T] 1 = a position whose key counts; absent: the image tokens
STACK_LIMIT_BYTES = 2 << 30
F32_EPS = float(np.finfo(np.float32).eps)


def image_token_id(config) -> int:
    for name in ("image_token_index", "image_token_id"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise AttributeError(f"{type(config).__name__} has no image token id")


def position_mask(model, batch: dict):
    """The batch's `vacuum_mask`, or its image tokens when it has none."""
    if MASK_KEY in batch:
        return batch[MASK_KEY].astype(bool)
    return batch["input_ids"] == image_token_id(model.config)


def _masked_keys(model, params, batch: dict, pooling: str = "tokens"):
    """{block path: (vectors [M, F] f32, weights [M])}: every key (tokens, M = B·T) or each row's mean key
    over its marked positions (mean, M = B); weight 0 marks a vector that does not count."""
    _, state = model.apply({"params": params}, **model_inputs(batch), mutable=["intermediates"])
    mask = position_mask(model, batch).astype(jnp.float32)
    out = {}
    for path, value in traverse_util.flatten_dict(state["intermediates"]).items():
        if path[-1] != "ffn_key":
            continue
        h = value[0].astype(jnp.float32)
        if pooling == "tokens":
            out["/".join(path[:-1])] = (h.reshape(-1, h.shape[-1]), mask.reshape(-1))
        else:
            counts = mask.sum(1)
            pooled = (h * mask[..., None]).sum(1) / jnp.maximum(counts, 1.0)[:, None]
            out["/".join(path[:-1])] = (pooled, (counts > 0).astype(jnp.float32))
    return out


def _key_moments(model, params, batch: dict, pooling: str = "tokens"):
    """One batch's contribution: {block path: (Σ w h hᵀ [F, F] f32, Σ w)}."""
    return {block: ((v * w[:, None]).T @ v, w.sum()) for block, (v, w) in _masked_keys(model, params, batch, pooling).items()}


masked_keys = jax.jit(_masked_keys, static_argnames=("model", "pooling"))
key_moments = jax.jit(_key_moments, static_argnames=("model", "pooling"))


def _moment_shardings(sharding, moments):
    """Σ h hᵀ [F, F] split over its first axis like the FFN width; counts replicated."""
    return {block: (sharding.sharding(("mlp", None), s.shape), sharding.replicated) for block, (s, _) in moments.items()}


def sharded_key_moments(model, sharding, pooling: str = "tokens"):
    """`key_moments` as a jit with explicit shardings: params by the parameter rules, the batch over
    `batch`, each block's [F, F] sum split over the FFN width."""

    def out_shardings(params, batch):
        abstract = jax.eval_shape(lambda p, b: _key_moments(model, p, b, pooling), params, batch)
        return _moment_shardings(sharding, abstract)

    return sharding.jit(lambda p, b: _key_moments(model, p, b, pooling),
                        lambda p, b: (sharding.tree(p), sharding.batch(b)), out_shardings)


@dataclasses.dataclass
class RetainKeys:
    """What the decomposition needs per block: the stacked keys [N, F] (kind "keys") or C = E[h hᵀ] (kind
    "moment", f64 numpy, or sharded f32 device arrays); `count` = N, the number of key vectors."""

    kind: str
    blocks: dict
    count: int


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _no_keys(what: str):
    return ValueError(f"no {what} in the retain batches: cannot build the vacuum projector")


def collect_keys(model, params, batches: Iterable[dict], pooling: str = "tokens", *, progress: bool = True,
                 stack_limit_bytes: int = STACK_LIMIT_BYTES, sharding=None, what: str = "retain keys") -> RetainKeys:
    """Stream batches -> `RetainKeys`: stacked while they fit in `stack_limit_bytes` (all blocks together),
    switching to the accumulated moment once they do not. With `sharding` (a `parallel.Sharder`), the moment
    stays on the devices, split over the FFN width (a 7B model's 32 blocks of 11008² would be 15 GB on one
    host)."""
    _check_pooling(pooling)
    if sharding is not None:
        moments, n = _collect_sharded(model, params, batches, pooling, progress, sharding)
        return RetainKeys("moment", moments, n)
    stacked: dict[str, list[np.ndarray]] | None = {}
    sums: dict[str, np.ndarray] = {}
    count, nbytes = 0, 0
    for batch in tqdm(batches, desc=what, unit="batch", disable=not progress, leave=False):
        out = jax.device_get(masked_keys(model, params, batch, pooling))
        for block, (v, w) in out.items():
            kept = np.asarray(v[np.asarray(w) > 0], np.float32)
            if stacked is not None:
                stacked.setdefault(block, []).append(kept)
                nbytes += kept.nbytes
            else:
                sums[block] = sums.get(block, 0.0) + kept.astype(np.float64).T @ kept
        count += int((np.asarray(next(iter(out.values()))[1]) > 0).sum())
        if stacked is not None and nbytes > stack_limit_bytes:  # too big to stack: continue as moments
            sums = {b: np.concatenate(p).astype(np.float64).T @ np.concatenate(p) for b, p in stacked.items()}
            stacked = None
    if count == 0:
        raise _no_keys(what)
    if stacked is not None:
        return RetainKeys("keys", {b: np.concatenate(p) for b, p in stacked.items()}, count)
    return RetainKeys("moment", {b: s / count for b, s in sums.items()}, count)


def collect_moments(model, params, batches: Iterable[dict], pooling: str = "tokens", progress: bool = True,
                    sharding=None):
    """Stream batches -> ({block: C = E[h hᵀ]}, N vectors): float64 numpy, or with `sharding` sharded f32
    arrays (which `build_vacuum_projectors` accepts as they are)."""
    keys = collect_keys(model, params, batches, pooling, progress=progress, sharding=sharding, stack_limit_bytes=0)
    return keys.blocks, keys.count


def _collect_sharded(model, params, batches, pooling, progress, sharding):
    step = sharded_key_moments(model, sharding, pooling)
    add = total = None
    for batch in tqdm(batches, desc="retain keys", unit="batch", disable=not progress, leave=False):
        out = step(params, batch)
        if total is None:
            total = out
            shardings = _moment_shardings(sharding, out)
            add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b), in_shardings=(shardings, shardings),
                          out_shardings=shardings, donate_argnums=(0,))
        else:
            total = add(total, out)
    counts = {block: float(n) for block, (_, n) in (total or {}).items()}
    if not counts or min(counts.values()) == 0:
        raise _no_keys("marked positions")
    divide = jax.jit(lambda s, n: s / n)
    return {block: divide(s, n) for block, (s, n) in total.items()}, int(min(counts.values()))


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of E[h hᵀ] (descending, f64) and their eigenvectors [F, k] (f32); `numerical_rank` counts the
    directions above the f32 noise floor."""

    eigvals: np.ndarray
    eigvecs: np.ndarray
    numerical_rank: int
    source: str  # "keys" or "moment"


def spectrum(data, count: int | None = None, kind: str = "moment", decomposition: str = "svd") -> Spectrum:
    """The retain keys' spectrum from stacked keys [N, F] (kind "keys") or a second moment [F, F]."""
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    x = jnp.asarray(data, jnp.float32)
    if kind == "keys":
        n, f = x.shape
        if decomposition == "eigh":
            return spectrum(x.T @ x / n, kind="moment", decomposition="eigh")
        _, s, vt = jnp.linalg.svd(x, full_matrices=False)
        s = np.asarray(s, np.float64)
        rank = int((s > s[0] * max(n, f) * F32_EPS).sum()) if s.size and s[0] > 0 else 0
        return Spectrum(s ** 2 / n, np.asarray(vt).T, rank, "keys")
    f = x.shape[0]
    if decomposition == "svd":
        u, s, _ = jnp.linalg.svd(x, full_matrices=False)  # C is symmetric PSD: its SVD is its eigendecomposition
        vals, vecs = np.asarray(s, np.float64), np.asarray(u)
    else:
        vals, vecs = jnp.linalg.eigh(x)  # ascending
        vals, vecs = np.asarray(vals, np.float64)[::-1], np.asarray(vecs)[:, ::-1]
    rank = int((vals > vals[0] * f * F32_EPS).sum()) if vals.size and vals[0] > 0 else 0
    return Spectrum(vals, vecs, rank, "moment")


def retained_count(spec: Spectrum, threshold: float, mode: str, rank: int | None = None) -> tuple[int, float]:
    """(how many leading directions are retained, the cut it corresponds to) under a threshold mode, capped at
    the numerical rank. energy: the fewest directions holding `threshold` of the trace; relative: eigenvalue ≥
    threshold × top; absolute: eigenvalue ≥ threshold (AlphaEdit's 2e-2); rank: `rank` directions."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    vals, cap = spec.eigvals, spec.numerical_rank
    f = spec.eigvecs.shape[0]
    if mode == "rank":
        if rank is None or not 0 <= rank <= f:
            raise ValueError(f"threshold mode 'rank' needs 0 <= rank <= {f}, got {rank}")
        k = rank
    elif mode == "energy":
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold mode 'energy' needs a fraction in (0, 1], got {threshold}")
        share = np.cumsum(vals) / max(vals.sum(), 1e-300)
        k = int(np.searchsorted(share, threshold - 1e-12) + 1) if vals.size else 0
    elif mode == "relative":
        k = int((vals >= threshold * (vals[0] if vals.size else 0.0)).sum())
    else:
        k = int((vals >= threshold).sum())
    k = min(k, cap)
    return k, float(vals[k - 1]) if k else float("inf")


@dataclasses.dataclass(frozen=True)
class LayerReport:
    block: str
    retained_rank: int
    null_dim: int
    numerical_rank: int
    top_eigenvalue: float
    threshold: float  # the smallest retained eigenvalue
    stored: str  # "basis", "dense" or "identity" (nothing retained)
    bytes: int


def vacuum_projector_from_spectrum(spec: Spectrum, threshold: float = 0.99, mode: str = "energy",
                                   rank: int | None = None, dtype=np.float32) -> tuple[dict, dict]:
    """{"basis": U_r} or {"dense": P} (or {} when nothing is retained) plus its report fields."""
    k, cut = retained_count(spec, threshold, mode, rank)
    f = spec.eigvecs.shape[0]
    basis = np.asarray(spec.eigvecs[:, :k], dtype)
    if k == 0:
        projector, stored = {}, "identity"
    elif k < f / 2:
        projector, stored = {"basis": jnp.asarray(basis)}, "basis"
    else:
        projector, stored = {"dense": jnp.asarray(np.eye(f, dtype=dtype) - basis @ basis.T)}, "dense"
    nbytes = int(sum(np.asarray(v).nbytes for v in projector.values()))
    info = {"retained_rank": k, "null_dim": f - k, "numerical_rank": spec.numerical_rank,
            "top_eigenvalue": float(spec.eigvals[0]) if spec.eigvals.size else 0.0, "threshold": cut,
            "stored": stored, "bytes": nbytes}
    return projector, info


def vacuum_projector_from_moment(c, threshold: float = 0.99, mode: str = "energy", rank: int | None = None,
                                 decomposition: str = "svd", dtype=np.float32) -> tuple[dict, dict]:
    """`vacuum_projector_from_spectrum` of one block's second moment."""
    return vacuum_projector_from_spectrum(spectrum(c, decomposition=decomposition), threshold, mode, rank, dtype)


def build_vacuum_projectors(stats, threshold: float = 0.99, mode: str = "energy", rank: int | None = None,
                            target: str = "down_proj", decomposition: str = "svd") -> tuple[dict, list[LayerReport]]:
    """Vacuum projector tree for the "vacuum" collection ({block}/{target}/basis|dense) and a per-layer report,
    from `RetainKeys` or a {block: second moment} dict."""
    keys = stats if isinstance(stats, RetainKeys) else RetainKeys("moment", stats, 0)
    flat, report = {}, []
    for block in sorted(keys.blocks, key=natural_key):
        spec = spectrum(keys.blocks[block], kind=keys.kind, decomposition=decomposition)
        projector, info = vacuum_projector_from_spectrum(spec, threshold, mode, rank)
        for name, value in projector.items():
            flat[tuple(block.split("/")) + (target, name)] = value
        report.append(LayerReport(block=block, **info))
    return traverse_util.unflatten_dict(flat), report


def format_report(report: list[LayerReport]) -> str:
    lines = ["block              retained  null  num.rank  top eig   smallest kept  stored  bytes"]
    for r in report:
        lines.append(f"{r.block:<18} {r.retained_rank:>8} {r.null_dim:>5} {r.numerical_rank:>9}  {r.top_eigenvalue:>8.3g}  "
                     f"{r.threshold:>13.3g}  {r.stored:<6} {r.bytes:>7}")
    return "\n".join(lines)
