"""Frozen model configs with lossless `from_hf_config` / `to_hf_config`.

The dataclasses are frozen and hashable so a Linen module holding one can be a static argument of
`jax.jit`. Fields mirror the Hugging Face `config.json` names; runtime-only knobs (compute dtype,
attention backend) live beside them and are never written back to `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax.numpy as jnp

ATTENTION_IMPLS = ("reference", "xla", "cudnn")
# Rematerialisation of decoder layers under autodiff (see llama.REMAT_POLICIES): "none" keeps every activation.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A config.json that this project cannot interpret."""


def _freeze(value: Any) -> Any:
    """Nested dicts/lists -> sorted tuples, so configs stay hashable."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and value and all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in value
    ):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def compute_dtype(name: str):
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown compute dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def _require(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in hf:
        raise ConfigError(f"{where}: required field {key!r} is missing")
    return hf[key]


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A Llama-family decoder (Llama; Qwen2 adds q/k/v biases)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope: tuple = (("rope_theta", 10000.0), ("rope_type", "default"))  # frozen rope_parameters
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None

    @property
    def rope_parameters(self) -> dict:
        return _thaw(self.rope)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], where: str = "text_config") -> "TextConfig":
        from .rope import rope_parameters_from_hf

        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "qwen2_vl_text"):
            raise ConfigError(f"{where}: model_type {model_type!r} is not a supported decoder (llama, qwen2)")
        hidden = _require(hf, "hidden_size", where)
        heads = _require(hf, "num_attention_heads", where)
        attention_bias = bool(hf.get("attention_bias", False))
        is_qwen = model_type != "llama"
        return cls(
            vocab_size=_require(hf, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_require(hf, "intermediate_size", where),
            num_hidden_layers=_require(hf, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "silu"),
            rope=_freeze(rope_parameters_from_hf(dict(hf))),
            qkv_bias=True if is_qwen else attention_bias,
            o_bias=False if is_qwen else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_freeze(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_config(self) -> dict:
        out = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "rope_parameters": self.rope_parameters,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _thaw(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ConfigError("Llama's attention_bias covers q, k, v and o alike; cannot export qkv_bias != o_bias")
            out["attention_bias"] = self.qkv_bias
        return out


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512  # unused by LLaVA; kept so exports round-trip

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], where: str = "vision_config") -> "CLIPVisionConfig":
        model_type = hf.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise ConfigError(f"{where}: vision model_type {model_type!r} is not supported (clip_vision_model)")
        return cls(
            hidden_size=_require(hf, "hidden_size", where),
            intermediate_size=_require(hf, "intermediate_size", where),
            num_hidden_layers=_require(hf, "num_hidden_layers", where),
            num_attention_heads=_require(hf, "num_attention_heads", where),
            image_size=_require(hf, "image_size", where),
            patch_size=_require(hf, "patch_size", where),
            num_channels=hf.get("num_channels", 3),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            hidden_act=hf.get("hidden_act", "quick_gelu"),
            projection_dim=hf.get("projection_dim", 512),
        )

    def to_hf_config(self) -> dict:
        out = {k: getattr(self, k) for k in (f.name for f in dataclasses.fields(self))}
        out["model_type"] = "clip_vision_model"
        return out


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """LLaVA-1.5: CLIP vision tower -> 2-layer MLP projector -> Llama decoder."""

    vision: CLIPVisionConfig
    text: TextConfig
    image_token_index: int = 32000
    image_seq_length: int = 576
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | tuple[int, ...] = -2
    multimodal_projector_bias: bool = True
    # Runtime-only (never exported): compute dtype, attention backend, decoder-layer remat policy.
    dtype: str = "float32"
    attention_impl: str = "reference"
    remat: str = "none"

    model_type = "llava"

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        compute_dtype(self.dtype)
        n = self.vision.num_hidden_layers
        for layer in self.feature_layers:
            if not -(n + 1) <= layer <= n:
                raise ConfigError(f"vision_feature_layer {layer} is out of range for a {n}-layer vision tower")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def num_image_tokens(self) -> int:
        """Image placeholder tokens per image in the prompt."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    def replace(self, **changes) -> "LlavaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **runtime) -> "LlavaConfig":
        if hf.get("model_type") != "llava":
            raise ConfigError(f"config.json: model_type {hf.get('model_type')!r} is not 'llava'")
        text_hf = dict(_require(hf, "text_config", "config.json"))
        text_hf.setdefault("model_type", "llama")
        # transformers forwards the top-level tie flag to the text model (LlavaConfig.__post_init__).
        if hf.get("tie_word_embeddings"):
            text_hf["tie_word_embeddings"] = True
        layer = hf.get("vision_feature_layer", -2)
        return cls(
            vision=CLIPVisionConfig.from_hf_config(_require(hf, "vision_config", "config.json")),
            text=TextConfig.from_hf_config(text_hf),
            image_token_index=hf.get("image_token_index", hf.get("image_token_id", 32000)),
            image_seq_length=hf.get("image_seq_length", 576),
            projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
            multimodal_projector_bias=hf.get("multimodal_projector_bias", True),
            **runtime,
        )

    def to_hf_config(self) -> dict:
        layer = self.vision_feature_layer
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "vision_config": self.vision.to_hf_config(),
            "text_config": self.text.to_hf_config(),
            "image_token_index": self.image_token_index,
            "image_seq_length": self.image_seq_length,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "dtype": "float32",
        }


# Defaults of transformers' Qwen2VLTextConfig (where they differ from TextConfig's) for fields a
# config.json may omit.
_QWEN2_VL_TEXT_DEFAULTS = {
    "rope_theta": 1000000.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32768,
    "num_key_value_heads": 8,
}
_QWEN2_VL_DEFAULT_MROPE_SECTION = (16, 24, 24)
# Keys of a flat (pre-nested, as Qwen2-VL-7B-Instruct ships) config.json that are not text-model fields.
_QWEN2_VL_MULTIMODAL_KEYS = (
    "vision_config", "text_config", "architectures", "model_type", "image_token_id", "video_token_id",
    "vision_start_token_id", "vision_end_token_id", "vision_token_id", "transformers_version",
)
# M-RoPE needs position-independent frequencies: "dynamic"/"longrope" switch them by sequence length.
_MROPE_UNSUPPORTED = ("dynamic", "longrope")


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """Qwen2-VL ViT: Conv3d patches, 2-D rotary, pre-LN blocks, then a 2x2 patch merger into the LM width."""

    depth: int
    embed_dim: int
    hidden_size: int  # merger output width (= the language model's hidden_size)
    num_heads: int
    mlp_ratio: float = 4
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0
    initializer_range: float = 0.02  # unused here; kept so exports round-trip

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"vision_config: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            # 2-D rotary splits each head into (h, w) halves of rotate_half pairs.
            raise ConfigError(f"vision_config: head dim {self.head_dim} must be a multiple of 4 for 2-D rotary")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values`: C · t · p · p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], where: str = "vision_config") -> "Qwen2VLVisionConfig":
        model_type = hf.get("model_type", "qwen2_vl_vision")
        if model_type not in ("qwen2_vl_vision", "qwen2_vl"):  # old checkpoints wrote "qwen2_vl" here
            raise ConfigError(
                f"{where}: vision model_type {model_type!r} is not a Qwen2-VL vision tower (qwen2_vl_vision)"
            )
        for key in ("patch_size", "temporal_patch_size"):
            if not isinstance(hf.get(key, 1), int):
                raise ConfigError(f"{where}: only integer {key} is supported, got {hf[key]!r}")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"{where}: vision rope_type must be 'axial', got {rope.get('rope_type')!r}")
        depth = hf.get("depth", hf.get("num_hidden_layers"))
        heads = hf.get("num_heads", hf.get("num_attention_heads"))
        if depth is None or heads is None:
            raise ConfigError(f"{where}: required fields 'depth' and 'num_heads' are missing")
        return cls(
            depth=depth,
            embed_dim=_require(hf, "embed_dim", where),
            hidden_size=_require(hf, "hidden_size", where),
            num_heads=heads,
            mlp_ratio=hf.get("mlp_ratio", 4),
            hidden_act=hf.get("hidden_act", "quick_gelu"),
            in_channels=hf.get("in_channels", hf.get("in_chans", 3)),
            patch_size=hf.get("patch_size", 14),
            spatial_merge_size=hf.get("spatial_merge_size", 2),
            temporal_patch_size=hf.get("temporal_patch_size", 2),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf_config(self) -> dict:
        return {
            "model_type": "qwen2_vl_vision",
            "depth": self.depth,
            "embed_dim": self.embed_dim,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "hidden_act": self.hidden_act,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
            "initializer_range": self.initializer_range,
        }


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Qwen2-VL: ViT with patch merger -> Qwen2 decoder with multimodal rotary (M-RoPE).

    `text.rope_parameters["mrope_section"]` splits the rotary frequency pairs into (temporal, height, width)
    sections; it sums to head_dim // 2.
    """

    vision: Qwen2VLVisionConfig
    text: TextConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Runtime-only (never exported): compute dtype, attention backend, decoder-layer remat policy.
    dtype: str = "float32"
    attention_impl: str = "reference"
    remat: str = "none"

    model_type = "qwen2_vl"

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        compute_dtype(self.dtype)
        text = self.text
        if self.vision.hidden_size != text.hidden_size:
            raise ConfigError(
                f"vision_config.hidden_size {self.vision.hidden_size} (merger output) != "
                f"text hidden_size {text.hidden_size}"
            )
        if not text.qkv_bias or text.o_bias or text.mlp_bias:
            raise ConfigError("a Qwen2-VL decoder has q/k/v biases only (qkv_bias=True, o_bias=mlp_bias=False)")
        rope_type = text.rope_parameters.get("rope_type", "default")
        if rope_type in _MROPE_UNSUPPORTED:
            raise ConfigError(f"rope_type {rope_type!r} is not supported with M-RoPE")
        if sum(self.mrope_section) != text.head_dim // 2:
            raise ConfigError(
                f"mrope_section {list(self.mrope_section)} sums to {sum(self.mrope_section)}; "
                f"expected head_dim // 2 = {text.head_dim // 2}"
            )

    @property
    def mrope_section(self) -> tuple[int, ...]:
        return tuple(self.text.rope_parameters.get("mrope_section", _QWEN2_VL_DEFAULT_MROPE_SECTION))

    def replace(self, **changes) -> "Qwen2VLConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **runtime) -> "Qwen2VLConfig":
        """Reads both layouts: nested `text_config` (transformers 5) and flat text fields (as released)."""
        from .rope import rope_parameters_from_hf

        if hf.get("model_type") != "qwen2_vl":
            raise ConfigError(f"config.json: model_type {hf.get('model_type')!r} is not 'qwen2_vl'")
        if isinstance(hf.get("text_config"), Mapping):
            text_hf = dict(hf["text_config"])
            where = "text_config"
        else:
            text_hf = {k: v for k, v in hf.items() if k not in _QWEN2_VL_MULTIMODAL_KEYS}
            where = "config.json"
        text_type = text_hf.get("model_type", "qwen2_vl_text")
        if text_type not in ("qwen2_vl_text", "qwen2_vl"):
            raise ConfigError(f"{where}: text model_type {text_type!r} is not a Qwen2-VL decoder (qwen2_vl_text)")
        text_hf["model_type"] = "qwen2_vl_text"
        if text_hf.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=True is not supported")
        source = text_hf.get("rope_scaling") or text_hf.get("rope_parameters") or {}
        if not (isinstance(source, Mapping) and source.get("rope_theta") is not None):
            text_hf.setdefault("rope_theta", _QWEN2_VL_TEXT_DEFAULTS["rope_theta"])
        for key, value in _QWEN2_VL_TEXT_DEFAULTS.items():
            if key != "rope_theta":
                text_hf.setdefault(key, value)
        try:
            rope = rope_parameters_from_hf(text_hf)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if rope["rope_type"] == "mrope":  # legacy spelling of default frequencies + sections
            rope["rope_type"] = "default"
        rope.setdefault("mrope_section", list(_QWEN2_VL_DEFAULT_MROPE_SECTION))
        text_hf.pop("rope_scaling", None)
        text_hf["rope_parameters"] = rope
        # transformers forwards a text-level (pre-v5) tie flag to the top level.
        text_hf["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings") or text_hf.get("tie_word_embeddings"))
        text = TextConfig.from_hf_config(text_hf, where)
        # Qwen2-VL attention ignores any head_dim field; its MLP has no biases.
        text = dataclasses.replace(text, head_dim=text.hidden_size // text.num_attention_heads, mlp_bias=False)
        return cls(
            vision=Qwen2VLVisionConfig.from_hf_config(_require(hf, "vision_config", "config.json")),
            text=text,
            image_token_id=hf.get("image_token_id", 151655),
            video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            **runtime,
        )

    def to_hf_config(self) -> dict:
        t = self.text
        text = {
            "model_type": "qwen2_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "hidden_act": t.hidden_act,
            "rope_parameters": t.rope_parameters,
            "use_sliding_window": False,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": _thaw(t.eos_token_id),
            "pad_token_id": t.pad_token_id,
        }
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "vision_config": self.vision.to_hf_config(),
            "text_config": text,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
            "dtype": "float32",
        }


def load_hf_config(path) -> dict:
    """Read config.json, with an error that names the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json; is this a Hugging Face checkpoint directory?") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
