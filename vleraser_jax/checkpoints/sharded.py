"""Loading a Hugging Face checkpoint straight into the shards of a device mesh.

Each process reads, with `safe_open(...).get_slice`, only the regions its own devices hold
(`jax.make_array_from_callback`), so a 7B checkpoint never materialises on one host or device.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from ..parallel import Sharder, logical_axes
from .loading import locate_tensors, open_checkpoint
from .names import Transform
from .safetensors_io import CheckpointError


def _disk_index(transform, index: tuple, disk_shape: tuple) -> tuple:
    """The on-disk region (torch layout) holding the Flax-layout region `index`."""
    if transform is Transform.LINEAR:  # flax [in, out] = torch [out, in]ᵀ
        return (index[1], index[0])
    if transform is Transform.CONV2D:  # flax [kh, kw, in, out] = torch [out, in, kh, kw] transposed
        return (index[3], index[2], index[0], index[1])
    if transform is Transform.CONV3D_AS_LINEAR:  # flax [in·t·kh·kw, out]: read whole rows of the out slice
        return (index[1],) + (slice(None),) * (len(disk_shape) - 1)
    return index


def _to_flax_region(transform, region: np.ndarray, index: tuple) -> np.ndarray:
    if transform is Transform.CONV3D_AS_LINEAR:
        return region.reshape(region.shape[0], -1).T[index[0]]
    return transform.to_flax(region)


def _torch_layout(transform, flax_shape: tuple) -> tuple:
    s = tuple(flax_shape)
    if transform is Transform.LINEAR:
        return s[::-1]
    if transform is Transform.CONV2D:
        return (s[3], s[2], s[0], s[1])
    return s


def load_pretrained_sharded(path, sharder: Sharder, dtype: str | None = None, param_dtype=jnp.float32,
                            attention_impl: str | None = None, stats: dict | None = None, remat: str | None = None):
    """`load_pretrained`, but every tensor is read straight into its shards.

    Same checks as `load_pretrained` (names through the architecture's table, on-disk shapes against the
    config, floating dtype, finite values per region, missing / unexpected / duplicate tensors), except the
    per-tensor SHA-256 that `save_pretrained` records: verifying it needs the whole tensor, which a sharded
    read never holds. stats (optional dict) receives {"bytes_read", "reads"} for this process.
    """
    directory, arch, config, model, expected = open_checkpoint(path, dtype, attention_impl, remat)
    located, _ = locate_tensors(directory, arch, config, expected)
    stats = {} if stats is None else stats
    stats.setdefault("bytes_read", 0)
    stats.setdefault("reads", [])
    flat = {}
    with contextlib.ExitStack() as stack:
        handles: dict[Any, Any] = {}
        for flax_path, (file, name, transform) in sorted(located.items()):
            shape = tuple(expected[flax_path][0])
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), framework="numpy"))
            sl = handles[file].get_slice(name)
            disk_shape = tuple(sl.get_shape())
            want = arch.torch_shape(config, flax_path) or _torch_layout(transform, shape)
            if disk_shape != tuple(want):
                raise CheckpointError(f"{file}: tensor {name!r} has shape {disk_shape}, but the config "
                                      f"({directory / 'config.json'}) implies {tuple(want)}")
            if sl.get_dtype() not in ("F16", "BF16", "F32", "F64"):
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {sl.get_dtype()}; parameters are floating point")
            sharding = sharder.sharding(logical_axes(flax_path, len(shape), sharder.param_axes), shape)
            read = _region_reader(sl, flax_path, name, file, transform, shape, disk_shape, param_dtype, stats)
            flat[tuple(flax_path.split("/"))] = jax.make_array_from_callback(shape, sharding, read)
    return model, traverse_util.unflatten_dict(flat), config


def _region_reader(sl, flax_path, name, file, transform, shape, disk_shape, param_dtype, stats):
    """The callback `make_array_from_callback` calls once per local device with that device's index."""
    memo: dict = {}

    def read(index):
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
        key = tuple((s.start, s.stop) for s in index)
        if key not in memo:  # devices holding the same replica share one read
            region = sl[_disk_index(transform, index, disk_shape)]
            stats["bytes_read"] += region.nbytes
            stats["reads"].append((flax_path, region.size, math.prod(shape)))
            region = _to_flax_region(transform, np.asarray(region), index)
            if not np.all(np.isfinite(region.astype(np.float32))):
                raise CheckpointError(f"{file}: tensor {name!r} contains NaN or Inf")
            memo[key] = np.ascontiguousarray(region.astype(param_dtype))
        return memo[key]

    return read
