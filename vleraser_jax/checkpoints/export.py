"""Exporting parameters as a Hugging Face checkpoint directory (transformers loads it with no missing or
unexpected keys), written atomically with per-tensor checksums."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from ..io import atomic_directory
from .names import architecture_for, expected_shapes
from .safetensors_io import (AUXILIARY_FILES, DIGEST_KEY, INDEX_NAME, WEIGHTS_NAME, CheckpointError, tensor_digest,
                             write_safetensors)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]+)\s*", size)
    if not m or m.group(2).upper() not in units:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '5GB'")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def torch_tensors(params, config, naming: str = "transformers", dtype=None) -> dict[str, np.ndarray]:
    """{HF tensor name: array in torch layout} for every parameter, checked against the config (names, shapes,
    finite values)."""
    arch = architecture_for(config.model_type)
    if naming not in arch.table.export_schemes:
        raise ValueError(f"naming must be one of {sorted(arch.table.export_schemes)}, got {naming!r}")
    expected = expected_shapes(arch.model_cls(config))
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    missing, extra = set(expected) - set(flat), set(flat) - set(expected)
    if missing or extra:
        raise CheckpointError(
            f"params do not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    tensors: dict[str, np.ndarray] = {}
    for flax_path, value in flat.items():
        if tuple(value.shape) != tuple(expected[flax_path][0]):
            raise CheckpointError(
                f"param {flax_path!r} has shape {tuple(value.shape)}, config implies {tuple(expected[flax_path][0])}"
            )
        name, transform = arch.table.to_hf_name(flax_path, naming)
        array = np.asarray(jax.device_get(value))
        if dtype is not None:
            array = array.astype(dtype)
        if not np.all(np.isfinite(array.astype(np.float32))):
            raise CheckpointError(f"refusing to export {flax_path!r} ({name}): it contains NaN or Inf")
        tensors[name] = np.ascontiguousarray(transform.to_torch(array, arch.torch_shape(config, flax_path)))
    return tensors


def _shards(tensors: dict[str, np.ndarray], max_shard_size: int | str) -> list[dict[str, np.ndarray]]:
    """Tensors in name order, cut into shards of at most `max_shard_size` bytes (a larger tensor alone)."""
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def _shard_metadata(shard: dict[str, np.ndarray]) -> dict[str, str]:
    return {"format": "pt", DIGEST_KEY: json.dumps({n: tensor_digest(n, t) for n, t in sorted(shard.items())})}


def _write_weights(tmp: Path, shards: list[dict[str, np.ndarray]]) -> None:
    if len(shards) == 1:
        write_safetensors(tmp / WEIGHTS_NAME, shards[0], _shard_metadata(shards[0]))
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / file, shard, _shard_metadata(shard))
        weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for shard in shards for t in shard.values())
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_pretrained(
    params,
    config,
    path,
    *,
    naming: str = "transformers",
    dtype=None,
    max_shard_size: int | str = "5GB",
    copy_files_from=None,
) -> Path:
    """Write a Hugging Face checkpoint directory that transformers loads with no missing/unexpected keys.

    naming: "transformers" (the names transformers 5 uses in memory) or "legacy" (the released
    checkpoints' names, which transformers 5's own save_pretrained also writes: llava-1.5-7b-hf's
    `language_model.model.*`, Qwen2-VL's `model.layers.*` / `visual.*`; readable by transformers 4.x).
    dtype: on-disk dtype (default: as stored). copy_files_from: a checkpoint dir whose
    tokenizer/processor files are copied alongside.
    The directory appears atomically: a failure leaves any previous one intact and no partial output.
    """
    shards = _shards(torch_tensors(params, config, naming, dtype), max_shard_size)
    hf_config = config.to_hf_config()
    if dtype is not None:
        hf_config["dtype"] = np.dtype(dtype).name
    target = Path(path)
    try:
        with atomic_directory(target) as tmp:
            _write_weights(tmp, shards)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
            if copy_files_from is not None:
                for fname in AUXILIARY_FILES:
                    src = Path(copy_files_from) / fname
                    if src.exists():
                        shutil.copy2(src, tmp / fname)
    except OSError as e:  # e.g. a full disk: say what survived
        previous = "the previous one is unchanged" if target.exists() else "nothing was written"
        raise CheckpointError(f"{target}: export failed ({e}); {previous}") from e
    return target
