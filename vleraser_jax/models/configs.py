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
    # Runtime-only (never exported): compute dtype and attention backend.
    dtype: str = "float32"
    attention_impl: str = "reference"

    model_type = "llava"

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
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


def load_hf_config(path) -> dict:
    """Read config.json, with an error that names the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json; is this a Hugging Face checkpoint directory?") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
