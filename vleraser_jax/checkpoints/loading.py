"""Loading a local Hugging Face checkpoint directory into (model, params, config).

Every header is checked against its file before safetensors maps it (errors name the file and tensor);
exports made here carry a per-tensor SHA-256 (`vleraser_sha256`) that the loader verifies, so a damaged
export is refused instead of loading as a different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from ..models.configs import ConfigError, load_hf_config
from .names import architecture_for, expected_shapes
from .safetensors_io import (INDEX_NAME, WEIGHTS_NAME, CheckpointError, read_safetensors_header, recorded_digests,
                             tensor_digest)


def weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if Path(f).name != f or f in (".", "..")]
        if outside:  # a shard path may not point outside the checkpoint directory
            raise CheckpointError(f"{index}: shard names must be plain file names in {directory}, got {outside[:5]}")
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        return [directory / f for f in files]
    if (directory / WEIGHTS_NAME).exists():
        return [directory / WEIGHTS_NAME]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise CheckpointError(
            f"{directory}: only pickled weights ({', '.join(pickled)}); this project never unpickles. Convert "
            "them to safetensors first (e.g. transformers' save_pretrained(..., safe_serialization=True))."
        )
    raise CheckpointError(f"{directory}: no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME})")


def load_config(path, **runtime):
    """(Architecture, config) from a checkpoint directory's config.json."""
    directory = Path(path)
    file = directory / "config.json"
    try:
        hf_config = load_hf_config(file)
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{file}: cannot be read as JSON text ({e})") from None
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{file}: expected a JSON object, got a JSON {type(hf_config).__name__}")
    arch = architecture_for(hf_config.get("model_type"), str(file))
    try:
        config = arch.config_cls.from_hf_config(hf_config, **runtime)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        # a field missing or of the wrong type: say which file, keep the cause for debugging
        raise ConfigError(f"{file}: not a usable {hf_config['model_type']} config ({type(e).__name__}: {e})") from e
    return arch, config


def open_checkpoint(path, dtype: str | None = None, attention_impl: str | None = None, remat: str | None = None):
    """Every loader's first steps: a checkpoint directory -> (directory, architecture, config, model,
    expected parameter shapes), with the config's faults raised as `ConfigError` naming the file.
    dtype / attention_impl / remat: runtime settings of the built model (None: the config's defaults)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    runtime = {k: v for k, v in (("dtype", dtype), ("attention_impl", attention_impl), ("remat", remat))
               if v is not None}
    arch, config = load_config(directory, **runtime)
    model = arch.model_cls(config)
    try:
        expected = expected_shapes(model)
    except Exception as e:  # e.g. heads that do not divide the width: the config is at fault, not the code
        raise ConfigError(
            f"{directory / 'config.json'}: describes a model that cannot be built ({type(e).__name__}: {e})"
        ) from e
    return directory, arch, config, model, expected


def _list_tensors(file: Path) -> tuple[list[str], dict[str, str] | None]:
    """(tensor names, recorded checksums or None) of one weight file, its header checked first."""
    digests = recorded_digests(file, read_safetensors_header(file))
    try:
        handle = safe_open(str(file), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    with handle as f:
        names = list(f.keys())
    if digests is not None and set(digests) != set(names):
        extra, lost = sorted(set(names) - set(digests)), sorted(set(digests) - set(names))
        raise CheckpointError(f"{file}: its tensors differ from those recorded at export: not recorded {extra[:5]}, "
                              f"recorded but absent {lost[:5]}")
    return names, digests


def locate_tensors(directory: Path, arch, config, expected: dict) -> tuple[dict, dict]:
    """Where every parameter is on disk: ({flax path: (file, tensor name, transform)}, {file: (the names that
    are no parameter: ignored buffers, a tied head's redundant copy), recorded checksums or None}).

    Raises `CheckpointError` naming the tensors that belong to no parameter, map onto one twice, or are missing.
    """
    located: dict[str, tuple[Path, str, object]] = {}
    files: dict[Path, tuple[list[str], dict | None]] = {}
    unexpected = []
    for file in weight_files(directory):
        names, digests = _list_tensors(file)
        redundant = []
        for name in names:
            mapped = None if arch.table.is_ignored(name) else arch.table.to_flax_path(name)
            if mapped is None and not arch.table.is_ignored(name):
                unexpected.append(f"{name} (in {file.name})")
                continue
            if mapped is None or (mapped[0] not in expected and mapped[0].endswith("lm_head/kernel")
                                  and config.text.tie_word_embeddings):
                redundant.append(name)  # tied: the head is the embedding, a stored copy is redundant
                continue
            flax_path, transform = mapped
            if flax_path not in expected:
                unexpected.append(f"{name} (in {file.name})")
            elif flax_path in located:
                raise CheckpointError(f"{file}: tensor {name!r} maps to {flax_path!r}, which was already found")
            else:
                located[flax_path] = (file, name, transform)
        files[file] = (redundant, digests)
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} tensor(s) do not belong to a {arch.model_cls.__name__} with this "
            f"config: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    missing = sorted(set(expected) - set(located))
    if missing:
        names = [arch.table.to_hf_name(p)[0] for p in missing]
        raise CheckpointError(f"{directory}: {len(missing)} tensor(s) missing from the checkpoint: "
                              f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    return located, files


def _checked_reader(f, file: Path, digests: dict | None):
    def read(name):
        try:
            tensor = f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
        if digests is not None and tensor_digest(name, tensor) != digests[name]:
            raise CheckpointError(f"{file}: tensor {name!r} does not match the SHA-256 recorded when it was "
                                  "exported; the file was modified or corrupted")
        return tensor

    return read


def _checked_value(tensor: np.ndarray, flax_path: str, name: str, file: Path, directory: Path, arch, config,
                   transform, shape) -> np.ndarray:
    """The tensor in Flax layout, after the dtype, on-disk shape, Flax shape and finiteness checks."""
    if not jnp.issubdtype(tensor.dtype, jnp.floating):
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {tensor.dtype}; parameters are floating point")
    value = transform.to_flax(tensor)
    disk_shape = arch.torch_shape(config, flax_path)
    if disk_shape is not None and tuple(tensor.shape) != disk_shape:
        raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config "
                              f"({directory / 'config.json'}) implies {disk_shape}")
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config "
                              f"({directory / 'config.json'}) implies {transform.torch_shape(shape)}")
    if not np.all(np.isfinite(value.astype(np.float32))):
        raise CheckpointError(f"{file}: tensor {name!r} contains NaN or Inf")
    return value


def load_pretrained(path, dtype: str | None = None, param_dtype=jnp.float32, attention_impl: str | None = None,
                    remat: str | None = None):
    """Load a local Hugging Face checkpoint directory -> (model, params, config).

    dtype: compute dtype name ("float32", "bfloat16"); parameters are stored as `param_dtype` (f32 master
    weights by default). Every tensor is checked against the model's expected shapes; missing, unexpected
    or mis-shaped tensors raise `CheckpointError` naming the tensor and file. Each tensor becomes a device
    array as soon as it is read, so at most one tensor's host copy is alive at a time.
    """
    directory, arch, config, model, expected = open_checkpoint(path, dtype, attention_impl, remat)
    located, files = locate_tensors(directory, arch, config, expected)
    flat: dict[tuple, jnp.ndarray] = {}
    for file, (redundant, digests) in files.items():
        with safe_open(str(file), framework="numpy") as f:
            read = _checked_reader(f, file, digests)
            if digests is not None:  # a recorded checksum covers every tensor of the file
                for name in redundant:
                    read(name)
            for flax_path, (_, name, transform) in sorted(located.items()):
                if located[flax_path][0] != file:
                    continue
                value = _checked_value(read(name), flax_path, name, file, directory, arch, config, transform,
                                       expected[flax_path][0])
                flat[tuple(flax_path.split("/"))] = jnp.asarray(value.astype(param_dtype))
    return model, traverse_util.unflatten_dict(flat), config
