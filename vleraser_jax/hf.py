"""Hugging Face safetensors checkpoints <-> Flax parameter pytrees, through one name table per architecture.

A table row pairs an HF tensor name template with a pytree path template and a layout transform; the same
row serves import and export. Placeholders: `{i}` is a layer number, `{name:a|b|c}` one of the listed
words. On-disk naming variants (e.g. LLaVA's legacy `language_model.model.*`, Qwen2-VL's `visual.*`) are
folded into the canonical transformers-v5 names by ordered alias rewrites before the table is consulted.

Safetensors only: pickled checkpoints (`*.bin`, `*.pt`) are refused, never opened.

Reliability: every header is checked against its file before safetensors maps it (errors name the file
and tensor); exports record a per-tensor SHA-256 in the safetensors metadata (`vleraser_sha256`), which
the loader verifies, so a damaged export is refused instead of loading as a different model; exports
are written into a temporary sibling directory and swapped into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read it)
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from .models.configs import ConfigError, LlavaConfig, Qwen2VLConfig, load_hf_config

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


def _recorded_digests(file: Path, metadata: dict[str, str]) -> dict[str, str] | None:
    if DIGEST_KEY not in metadata:
        return None  # a checkpoint from elsewhere (transformers writes none)
    try:
        digests = json.loads(metadata[DIGEST_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: metadata {DIGEST_KEY!r} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"{file}: metadata {DIGEST_KEY!r} is not a map of tensor checksums; the file is corrupt")
    return digests


class Transform(enum.Enum):
    """How a torch tensor maps onto its Flax parameter (and back)."""

    NONE = "none"
    LINEAR = "linear"  # torch [out, in] <-> flax kernel [in, out]
    CONV2D = "conv2d"  # torch [out, in, kh, kw] <-> flax [kh, kw, in, out]
    CONV3D_AS_LINEAR = "conv3d_as_linear"  # torch [out, in, t, kh, kw] <-> flax [in·t·kh·kw, out]

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        if self is Transform.LINEAR:
            return x.T
        if self is Transform.CONV2D:
            return x.transpose(2, 3, 1, 0)
        if self is Transform.CONV3D_AS_LINEAR:
            return x.reshape(x.shape[0], -1).T
        return x

    def torch_shape(self, flax_shape: Sequence[int]) -> str:
        """The on-disk shape a Flax shape corresponds to (for error messages)."""
        s = tuple(flax_shape)
        if self is Transform.LINEAR:
            return str(s[::-1])
        if self is Transform.CONV2D:
            return str((s[3], s[2], s[0], s[1]))
        if self is Transform.CONV3D_AS_LINEAR:
            return f"{s[1]} x {s[0]} elements (Flax layout {s})"
        return str(s)

    def to_torch(self, x: np.ndarray, torch_shape: Sequence[int] | None = None) -> np.ndarray:
        if self is Transform.LINEAR:
            return x.T
        if self is Transform.CONV2D:
            return x.transpose(3, 2, 0, 1)
        if self is Transform.CONV3D_AS_LINEAR:
            return x.T.reshape(torch_shape)
        return x


_PLACEHOLDER = re.compile(r"\{(\w+)(?::([\w|]+))?\}")


def _placeholder_choices(template: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _PLACEHOLDER.finditer(template) if m.group(2)}


def _template_regex(template: str, choices: dict[str, str]) -> re.Pattern:
    """Compile a name template into an anchored regex with named groups (`{i}` = digits)."""
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        name = m.group(1)
        alternatives = m.group(2) or choices.get(name)
        out.append(f"(?P<{name}>{alternatives if alternatives else r'[0-9]+'})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _fill(template: str, values: dict) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    flax: str
    transform: Transform = Transform.NONE

    def __post_init__(self):
        choices = _placeholder_choices(self.hf)
        object.__setattr__(self, "_hf_re", _template_regex(self.hf, choices))
        object.__setattr__(self, "_flax_re", _template_regex(self.flax, choices))


@dataclasses.dataclass(frozen=True)
class NameTable:
    """One architecture's mapping; `aliases` fold on-disk variants into the canonical HF names."""

    rules: tuple[Rule, ...]
    aliases: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()  # regexes of buffers that are not parameters
    export_schemes: dict = dataclasses.field(default_factory=dict)  # scheme -> ((canonical prefix, on-disk prefix), ...)

    def canonical(self, name: str) -> str:
        for pattern, replacement in self.aliases:
            new = re.sub(pattern, replacement, name)
            if new != name:
                return new
        return name

    def is_ignored(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.ignored)

    def to_flax_path(self, hf_name: str) -> tuple[str, Transform] | None:
        name = self.canonical(hf_name)
        for rule in self.rules:
            m = rule._hf_re.match(name)
            if m:
                return _fill(rule.flax, m.groupdict()), rule.transform
        return None

    def to_hf_name(self, flax_path: str, scheme: str = "transformers") -> tuple[str, Transform]:
        for rule in self.rules:
            m = rule._flax_re.match(flax_path)
            if m:
                name = _fill(rule.hf, m.groupdict())
                for canonical_prefix, disk_prefix in self.export_schemes.get(scheme, ()):
                    if name.startswith(canonical_prefix):
                        name = disk_prefix + name[len(canonical_prefix) :]
                        break
                return name, rule.transform
        raise CheckpointError(f"parameter {flax_path!r} has no entry in the name table; cannot export it")


_LLAMA_PROJ = "q_proj|k_proj|v_proj|o_proj"
_MLP_PROJ = "gate_proj|up_proj|down_proj"


def decoder_rules(hf_prefix: str, flax_prefix: str) -> list[Rule]:
    """Rules for a Llama/Qwen2 decoder stack (shared by LLaVA and Qwen2-VL)."""
    lm, fl = hf_prefix, flax_prefix
    return [
        Rule(f"{lm}.embed_tokens.weight", f"{fl}/embed_tokens/embedding"),
        Rule(f"{lm}.layers.{{i}}.self_attn.{{p:{_LLAMA_PROJ}}}.weight", f"{fl}/layers_{{i}}/self_attn/{{p}}/kernel", Transform.LINEAR),
        Rule(f"{lm}.layers.{{i}}.self_attn.{{p:{_LLAMA_PROJ}}}.bias", f"{fl}/layers_{{i}}/self_attn/{{p}}/bias"),
        Rule(f"{lm}.layers.{{i}}.mlp.{{p:{_MLP_PROJ}}}.weight", f"{fl}/layers_{{i}}/mlp/{{p}}/kernel", Transform.LINEAR),
        Rule(f"{lm}.layers.{{i}}.mlp.{{p:{_MLP_PROJ}}}.bias", f"{fl}/layers_{{i}}/mlp/{{p}}/bias"),
        Rule(
            f"{lm}.layers.{{i}}.{{n:input_layernorm|post_attention_layernorm}}.weight",
            f"{fl}/layers_{{i}}/{{n}}/scale",
        ),
        Rule(f"{lm}.norm.weight", f"{fl}/norm/scale"),
        Rule("lm_head.weight", f"{fl}/lm_head/kernel", Transform.LINEAR),
    ]


LLAVA_TABLE = NameTable(
    rules=tuple(
        decoder_rules("model.language_model", "llm")
        + [
            Rule("model.vision_tower.embeddings.class_embedding", "vision/embeddings/class_embedding"),
            Rule(
                "model.vision_tower.embeddings.patch_embedding.weight",
                "vision/embeddings/patch_embedding/kernel",
                Transform.CONV2D,
            ),
            Rule(
                "model.vision_tower.embeddings.position_embedding.weight",
                "vision/embeddings/position_embedding/embedding",
            ),
            Rule("model.vision_tower.{n:pre_layrnorm|post_layernorm}.weight", "vision/{n}/scale"),
            Rule("model.vision_tower.{n:pre_layrnorm|post_layernorm}.bias", "vision/{n}/bias"),
            Rule(
                "model.vision_tower.encoder.layers.{i}.self_attn.{p:q_proj|k_proj|v_proj|out_proj}.weight",
                "vision/layers_{i}/self_attn/{p}/kernel",
                Transform.LINEAR,
            ),
            Rule(
                "model.vision_tower.encoder.layers.{i}.self_attn.{p:q_proj|k_proj|v_proj|out_proj}.bias",
                "vision/layers_{i}/self_attn/{p}/bias",
            ),
            Rule("model.vision_tower.encoder.layers.{i}.{n:layer_norm1|layer_norm2}.weight", "vision/layers_{i}/{n}/scale"),
            Rule("model.vision_tower.encoder.layers.{i}.{n:layer_norm1|layer_norm2}.bias", "vision/layers_{i}/{n}/bias"),
            Rule(
                "model.vision_tower.encoder.layers.{i}.mlp.{p:fc1|fc2}.weight",
                "vision/layers_{i}/{p}/kernel",
                Transform.LINEAR,
            ),
            Rule("model.vision_tower.encoder.layers.{i}.mlp.{p:fc1|fc2}.bias", "vision/layers_{i}/{p}/bias"),
            Rule("model.multi_modal_projector.{p:linear_1|linear_2}.weight", "projector/{p}/kernel", Transform.LINEAR),
            Rule("model.multi_modal_projector.{p:linear_1|linear_2}.bias", "projector/{p}/bias"),
        ]
    ),
    # First match wins. Covers llava-1.5-7b-hf (legacy), what transformers 5 writes, and its runtime names.
    aliases=(
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^language_model\.", "model.language_model."),
        (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
        (r"^vision_tower\.vision_model\.", "model.vision_tower."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    ),
    ignored=(r"embeddings\.position_ids$", r"rotary_emb\.inv_freq$"),
    export_schemes={
        "transformers": (),
        # As shipped by llava-hf/llava-1.5-7b-hf (and readable by transformers 4.x).
        "legacy": (
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ),
    },
)


_VISUAL = "model.visual"
QWEN2VL_TABLE = NameTable(
    rules=tuple(
        decoder_rules("model.language_model", "llm")
        + [
            Rule(f"{_VISUAL}.patch_embed.proj.weight", "vision/patch_embed/proj/kernel", Transform.CONV3D_AS_LINEAR),
            Rule(f"{_VISUAL}.blocks.{{i}}.{{n:norm1|norm2}}.weight", "vision/blocks_{i}/{n}/scale"),
            Rule(f"{_VISUAL}.blocks.{{i}}.{{n:norm1|norm2}}.bias", "vision/blocks_{i}/{n}/bias"),
            Rule(
                f"{_VISUAL}.blocks.{{i}}.attn.{{p:qkv|proj}}.weight", "vision/blocks_{i}/attn/{p}/kernel", Transform.LINEAR
            ),
            Rule(f"{_VISUAL}.blocks.{{i}}.attn.{{p:qkv|proj}}.bias", "vision/blocks_{i}/attn/{p}/bias"),
            Rule(f"{_VISUAL}.blocks.{{i}}.mlp.{{p:fc1|fc2}}.weight", "vision/blocks_{i}/{p}/kernel", Transform.LINEAR),
            Rule(f"{_VISUAL}.blocks.{{i}}.mlp.{{p:fc1|fc2}}.bias", "vision/blocks_{i}/{p}/bias"),
            Rule(f"{_VISUAL}.merger.ln_q.weight", "vision/merger/ln_q/scale"),
            Rule(f"{_VISUAL}.merger.ln_q.bias", "vision/merger/ln_q/bias"),
            Rule(f"{_VISUAL}.merger.mlp.{{j:0|2}}.weight", "vision/merger/mlp_{j}/kernel", Transform.LINEAR),
            Rule(f"{_VISUAL}.merger.mlp.{{j:0|2}}.bias", "vision/merger/mlp_{j}/bias"),
        ]
    ),
    # Canonical = transformers 5's in-memory names. Qwen2-VL-7B-Instruct, and transformers 5's own
    # save_pretrained, write `model.layers...` / `visual...`.
    aliases=(
        (r"^model\.(?=(layers|embed_tokens|norm)\.)", "model.language_model."),
        (r"^visual\.", "model.visual."),
    ),
    ignored=(r"rotary_emb\.inv_freq$", r"rotary_pos_emb\.inv_freq$"),
    export_schemes={
        "transformers": (),
        "legacy": (("model.language_model.", "model."), ("model.visual.", "visual.")),
    },
)


def _qwen2_vl_torch_shapes(config) -> dict[str, tuple[int, ...]]:
    v = config.vision
    return {
        "vision/patch_embed/proj/kernel": (
            v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
        )
    }


@dataclasses.dataclass(frozen=True)
class Architecture:
    config_cls: type
    model_cls: Callable[[Any], Any]
    table: NameTable
    # On-disk shapes that the Flax shape alone does not determine (a Conv3d stored as a linear kernel).
    torch_shapes: Callable[[Any], dict[str, tuple[int, ...]]] | None = None

    def torch_shape(self, config, flax_path: str) -> tuple[int, ...] | None:
        return None if self.torch_shapes is None else self.torch_shapes(config).get(flax_path)


def _architectures() -> dict[str, Architecture]:
    from .models.llava import LlavaForConditionalGeneration
    from .models.qwen2_vl import Qwen2VLForConditionalGeneration

    return {
        "llava": Architecture(LlavaConfig, LlavaForConditionalGeneration, LLAVA_TABLE),
        "qwen2_vl": Architecture(Qwen2VLConfig, Qwen2VLForConditionalGeneration, QWEN2VL_TABLE, _qwen2_vl_torch_shapes),
    }


def register_architecture(model_type: str, architecture: Architecture) -> None:
    _EXTRA_ARCHITECTURES[model_type] = architecture


_EXTRA_ARCHITECTURES: dict[str, Architecture] = {}


def architecture_for(model_type: str, where: str = "config.json") -> Architecture:
    archs = {**_architectures(), **_EXTRA_ARCHITECTURES}
    if not isinstance(model_type, str) or model_type not in archs:
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported; supported: {sorted(archs)}")
    return archs[model_type]


def expected_shapes(model) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Flat '/'-joined parameter path -> (shape, dtype), from an abstract init (no memory is allocated)."""
    try:
        hash(model)
    except TypeError:  # an unhashable module: not cached
        return dict(_expected_shapes.__wrapped__(model))
    return dict(_expected_shapes(model))


@functools.lru_cache(maxsize=32)  # modules are frozen dataclasses: equal config, equal shapes; saves a trace per load
def _expected_shapes(model) -> dict[str, tuple[tuple[int, ...], Any]]:
    inputs = model.dummy_inputs()
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs))["params"]
    return {"/".join(k): (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(abstract).items()}


def init_params(model, rng) -> dict:
    """Randomly initialised parameters (for training from scratch and tests)."""
    return model.init(rng, **model.dummy_inputs())["params"]


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


def load_pretrained(path, dtype: str | None = None, param_dtype=jnp.float32, attention_impl: str | None = None,
                    remat: str | None = None):
    """Load a local Hugging Face checkpoint directory -> (model, params, config).

    dtype: compute dtype name ("float32", "bfloat16"); parameters are stored as `param_dtype` (f32 master
    weights by default). Every tensor is checked against the model's expected shapes; missing, unexpected
    or mis-shaped tensors raise `CheckpointError` naming the tensor and file.
    """
    directory, arch, config, model, expected = open_checkpoint(path, dtype, attention_impl, remat)
    flat: dict[str, np.ndarray] = {}
    unexpected: list[str] = []
    for file in weight_files(directory):
        digests = _recorded_digests(file, read_safetensors_header(file))
        try:
            handle = safe_open(str(file), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        with handle as f:
            names = list(f.keys())
            if digests is not None and set(digests) != set(names):
                extra, lost = sorted(set(names) - set(digests)), sorted(set(digests) - set(names))
                raise CheckpointError(
                    f"{file}: its tensors differ from those recorded at export: not recorded {extra[:5]}, "
                    f"recorded but absent {lost[:5]}"
                )

            def read(name):
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
                if digests is not None and tensor_digest(name, tensor) != digests[name]:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} does not match the SHA-256 recorded when it was exported; "
                        "the file was modified or corrupted"
                    )
                return tensor

            for name in names:
                if arch.table.is_ignored(name):
                    if digests is not None:
                        read(name)
                    continue
                mapped = arch.table.to_flax_path(name)
                if mapped is None:
                    unexpected.append(f"{name} (in {file.name})")
                    continue
                flax_path, transform = mapped
                if flax_path not in expected:
                    if flax_path.endswith("lm_head/kernel") and config.text.tie_word_embeddings:
                        if digests is not None:
                            read(name)
                        continue  # tied: the head is the embedding, a stored copy is redundant
                    unexpected.append(f"{name} (in {file.name})")
                    continue
                if flax_path in flat:
                    raise CheckpointError(f"{file}: tensor {name!r} maps to {flax_path!r}, which was already loaded")
                tensor = read(name)
                if not jnp.issubdtype(tensor.dtype, jnp.floating):
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has dtype {tensor.dtype}; parameters are floating point"
                    )
                value = transform.to_flax(tensor)
                shape, _ = expected[flax_path]
                disk_shape = arch.torch_shape(config, flax_path)
                if disk_shape is not None and tuple(tensor.shape) != disk_shape:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config "
                        f"({directory / 'config.json'}) implies {disk_shape}"
                    )
                if tuple(value.shape) != tuple(shape):
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config "
                        f"({directory / 'config.json'}) implies {transform.torch_shape(shape)}"
                    )
                if not np.all(np.isfinite(value.astype(np.float32))):
                    raise CheckpointError(f"{file}: tensor {name!r} contains NaN or Inf")
                flat[flax_path] = value.astype(param_dtype)
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} tensor(s) do not belong to a {type(model).__name__} with this "
            f"config: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}"
        )
    missing = sorted(set(expected) - set(flat))
    if missing:
        names = [arch.table.to_hf_name(p)[0] for p in missing]
        raise CheckpointError(
            f"{directory}: {len(missing)} tensor(s) missing from the checkpoint: "
            f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"
        )
    params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    return model, params, config


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]+)\s*", size)
    if not m or m.group(2).upper() not in units:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '5GB'")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # old kernel or a filesystem without exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so a rename never publishes data still in flight."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def _replace_directory(tmp: Path, target: Path) -> None:
    """Move a fully written tmp dir onto target. With RENAME_EXCHANGE the target path always holds either
    the old or the new directory; otherwise there is a window of two renames, and the old one is restored if
    the second fails."""
    if target.exists() and target.is_dir() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous output
        return
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target` to write into; when the block succeeds it is flushed
    to disk and swapped in for `target`; when it fails (a full disk included) it is deleted and `target`,
    if it existed, is left exactly as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _replace_directory(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    arch = architecture_for(config.model_type)
    if naming not in arch.table.export_schemes:
        raise ValueError(f"naming must be one of {sorted(arch.table.export_schemes)}, got {naming!r}")
    model = arch.model_cls(config)
    expected = expected_shapes(model)
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
    hf_config = config.to_hf_config()
    if dtype is not None:
        hf_config["dtype"] = np.dtype(dtype).name

    def shard_metadata(shard):
        return {"format": "pt", DIGEST_KEY: json.dumps({n: tensor_digest(n, t) for n, t in sorted(shard.items())})}

    target = Path(path)
    try:
        with atomic_directory(target) as tmp:
            if len(shards) == 1:
                write_safetensors(tmp / WEIGHTS_NAME, shards[0], shard_metadata(shards[0]))
            else:
                weight_map = {}
                for k, shard in enumerate(shards, 1):
                    file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                    write_safetensors(tmp / file, shard, shard_metadata(shard))
                    weight_map.update({name: file for name in shard})
                total = sum(t.nbytes for t in tensors.values())
                (tmp / INDEX_NAME).write_text(
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
                )
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
