"""Safetensors files: header validation (errors name the file and tensor), a byte-deterministic writer and
per-tensor SHA-256 checksums. Safetensors only: pickled checkpoints are refused, never opened."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read it)
import numpy as np


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files besides the weights that make a checkpoint directory usable (tokenizer, processors, generation).
AUXILIARY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written; the message names the file and tensor."""


DIGEST_KEY = "vleraser_sha256"  # safetensors metadata: JSON {tensor name: sha256 hex}, written by save_pretrained
# Bytes per element of each safetensors dtype (the format's own list).
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(file: Path) -> dict[str, str]:
    """Check a safetensors header against its file; returns the `__metadata__` dict.

    safetensors validates too, but its messages do not say which tensor is wrong; these do. Checks: the
    header length fits the file, the header is a JSON object, each tensor has a known dtype, a shape of
    non-negative ints and a byte span equal to shape x dtype size, and the spans tile the data exactly
    (no gap, overlap, truncation or trailing bytes).
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors header (truncated?)")
            n = int.from_bytes(prefix, "little")
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{file}: header length {n} does not fit the file ({size} bytes); truncated or corrupt"
                )
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        where = f"{file}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is not an object ({info!r:.80})")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r:.40} in the header")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: header shape {shape!r:.80} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: header data_offsets {offsets!r:.80} are not [begin, end] byte offsets")
        nbytes = math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: the header says {dtype} {tuple(shape)} ({nbytes} bytes) but gives it "
                f"{offsets[1] - offsets[0]} bytes (data_offsets {offsets})"
            )
        if offsets[1] > data_size:
            raise CheckpointError(
                f"{where}: its data ends at byte {offsets[1]}, but the file holds only {data_size} bytes of "
                "tensor data (truncated?)"
            )
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(
                f"{file}: tensor {name!r} starts at data byte {begin}, expected {position} "
                f"({'overlaps the previous tensor' if begin < position else 'a gap before it'})"
            )
        position = end
    if position != data_size:
        raise CheckpointError(f"{file}: {data_size - position} bytes after the last tensor that no header entry covers")
    return metadata


_NUMPY_TO_SAFETENSORS = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
    "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32", "int64": "I64", "uint64": "U64",
    "float64": "F64",
}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a safetensors file whose bytes depend only on its contents.

    safetensors' own writer emits the metadata map in a random (Rust HashMap) order, so two exports of the
    same parameters would differ; here the header is canonical JSON. Layout as safetensors writes it:
    data sorted by (larger dtype first, name) to keep each tensor aligned, header padded to 8 bytes.
    """
    if not np.little_endian:  # the format is little-endian; so are all platforms we run on
        raise CheckpointError("writing safetensors needs a little-endian host")
    names = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        array = tensors[name]
        if array.dtype.name not in _NUMPY_TO_SAFETENSORS:
            raise CheckpointError(f"tensor {name!r}: dtype {array.dtype} has no safetensors equivalent")
        header[name] = {"dtype": _NUMPY_TO_SAFETENSORS[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8).data)


def tensor_digest(name: str, array: np.ndarray) -> str:
    """SHA-256 of a tensor's name, dtype, shape and bytes (what an export records and a load checks)."""
    h = hashlib.sha256(f"{name}\0{array.dtype.name}\0{tuple(array.shape)}\0".encode())
    h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return h.hexdigest()


def recorded_digests(file: Path, metadata: dict[str, str]) -> dict[str, str] | None:
    if DIGEST_KEY not in metadata:
        return None  # a checkpoint from elsewhere (transformers writes none)
    try:
        digests = json.loads(metadata[DIGEST_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: metadata {DIGEST_KEY!r} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"{file}: metadata {DIGEST_KEY!r} is not a map of tensor checksums; the file is corrupt")
    return digests
