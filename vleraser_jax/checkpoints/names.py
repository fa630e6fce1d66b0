"""One name table per architecture: HF safetensors tensor names <-> Flax parameter paths.

A table row pairs an HF tensor name template with a pytree path template and a layout transform; the same
row serves import and export. Placeholders: `{i}` is a layer number, `{name:a|b|c}` one of the listed
words. On-disk naming variants (e.g. LLaVA's legacy `language_model.model.*`, Qwen2-VL's `visual.*`) are
folded into the canonical transformers-v5 names by ordered alias rewrites before the table is consulted.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import traverse_util

from ..models.configs import ConfigError, LlavaConfig, Qwen2VLConfig
from .safetensors_io import CheckpointError


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
    from ..models.llava import LlavaForConditionalGeneration
    from ..models.qwen2_vl import Qwen2VLForConditionalGeneration

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
