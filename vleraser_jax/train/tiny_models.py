"""The tiny models trained from scratch on the synthetic benchmark: their configs (from `c.model`'s sizes and the
tokenizer's ids) and a transformers-style random init."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ..checkpoints import init_params
from ..models.configs import CLIPVisionConfig, LlavaConfig, Qwen2VLConfig, Qwen2VLVisionConfig, TextConfig
from ..processing import QWEN2_VL_SPECIAL_TOKENS


def model_config(c, tokenizer) -> LlavaConfig | Qwen2VLConfig:
    """The tiny model of `c.family` ("llava" | "qwen2_vl") from `c.model`'s sizes and the tokenizer's ids."""
    family = c.get("family", "llava")
    if family == "qwen2_vl":
        return _qwen2_vl_config(c, tokenizer)
    if family != "llava":
        raise ValueError(f"family must be 'llava' or 'qwen2_vl', got {family!r}")
    m = c.model
    vision = CLIPVisionConfig(
        hidden_size=m.vision_hidden_size, intermediate_size=m.vision_intermediate_size,
        num_hidden_layers=m.vision_layers, num_attention_heads=m.vision_heads,
        image_size=c.data.image_size, patch_size=m.patch_size, projection_dim=m.vision_hidden_size,
    )
    text = TextConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
        head_dim=m.hidden_size // m.heads, max_position_embeddings=m.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    return LlavaConfig(vision=vision, text=text, image_token_index=image_token,
                       image_seq_length=vision.num_patches, vision_feature_layer=m.vision_feature_layer,
                       dtype=m.dtype, attention_impl=m.attention)


def _qwen2_vl_config(c, tokenizer) -> Qwen2VLConfig:
    """Qwen2-VL at toy width: a ViT of `vision_*` sizes whose patch merger feeds a Qwen2 decoder (q/k/v biases,
    M-RoPE split by `model.mrope_section`)."""
    m = c.model
    if m.vision_intermediate_size % m.vision_hidden_size:  # transformers' config stores an integer mlp_ratio
        raise ValueError(f"model.vision_intermediate_size {m.vision_intermediate_size} must be a multiple of "
                         f"model.vision_hidden_size {m.vision_hidden_size} for Qwen2-VL")
    vision = Qwen2VLVisionConfig(
        depth=m.vision_layers, embed_dim=m.vision_hidden_size, hidden_size=m.hidden_size, num_heads=m.vision_heads,
        mlp_ratio=m.vision_intermediate_size // m.vision_hidden_size, patch_size=m.patch_size,
        spatial_merge_size=m.merge_size,
    )
    text = TextConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
        head_dim=m.hidden_size // m.heads, max_position_embeddings=m.max_position_embeddings, qkv_bias=True,
        model_type="qwen2_vl_text",
        rope=(("mrope_section", tuple(m.mrope_section)), ("rope_theta", float(m.rope_theta)), ("rope_type", "default")),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
        QWEN2_VL_SPECIAL_TOKENS[2:])}
    return Qwen2VLConfig(vision=vision, text=text, **ids, dtype=m.dtype, attention_impl=m.attention)


def init_from_scratch(model, seed: int, std: float = 0.02) -> dict:
    """transformers-style init: N(0, std) matrices and embeddings, zero biases, unit norm scales.

    Shapes come from `jax.eval_shape` (nothing is run) and values from numpy's seeded generator, one
    stream per parameter path: no per-shape compilation, so this takes milliseconds, not seconds.
    """
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(seed)))
    out = {}
    for path, value in traverse_util.flatten_dict(shapes).items():
        name = path[-1]
        if name == "scale":
            array = np.ones(value.shape, value.dtype)
        elif name == "bias":
            array = np.zeros(value.shape, value.dtype)
        else:
            stream = int.from_bytes(hashlib.sha256("/".join(path).encode()).digest()[:4], "little")
            array = (std * np.random.default_rng([seed, stream]).standard_normal(value.shape)).astype(value.dtype)
        out[path] = jnp.asarray(array)
    return traverse_util.unflatten_dict(out)
