"""CLIP ViT vision tower as used by LLaVA-1.5 (pre-layernorm, class token, learned positions)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .configs import CLIPVisionConfig
from .layers import Dense, activation, attention


class CLIPEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, C, H, W] (the processor's NCHW layout) -> [B, 1 + P, D]."""
        cfg = self.config
        if pixel_values.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values has spatial size {tuple(pixel_values.shape[-2:])}; the vision tower expects "
                f"{cfg.image_size}x{cfg.image_size}"
            )
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
        patches = nn.Conv(
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="patch_embedding",
        )(x)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major over the patch grid, as torch flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed(
            cfg.num_patches + 1, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name="position_embedding"
        )(jnp.arange(cfg.num_patches + 1))
        return x + positions[None]


class CLIPAttention(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        dense = lambda name: Dense(cfg.hidden_size, dtype=self.dtype, name=name)
        b, t, _ = x.shape
        q, k, v = (dense(n)(x).reshape(b, t, heads, head_dim) for n in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, None, scale=head_dim**-0.5, impl=self.attention_impl)
        return dense("out_proj")(out.reshape(b, t, cfg.hidden_size))


class CLIPEncoderLayer(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        x = x + CLIPAttention(cfg, self.dtype, self.attention_impl, name="self_attn")(norm("layer_norm1")(x))
        h = norm("layer_norm2")(x)
        h = Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(h)
        h = activation(cfg.hidden_act)(h)
        h = Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)
        return x + h


class CLIPVisionTower(nn.Module):
    """Returns the hidden states requested by `feature_layers` (indices into [embeddings, layer 1..n]).

    Layers past the deepest requested one are skipped at apply time (LLaVA's default -2 never needs the
    last layer), but still created at init so checkpoints round-trip.
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"

    @nn.compact
    def __call__(self, pixel_values, feature_layers=(-1,)):
        cfg = self.config
        n = cfg.num_hidden_layers
        wanted = [layer if layer >= 0 else n + 1 + layer for layer in feature_layers]
        depth = n if self.is_initializing() else max(wanted)
        x = CLIPEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        ln = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        x = ln("pre_layrnorm")(x)  # sic: the HF parameter name
        hidden = [x]
        for i in range(depth):
            x = CLIPEncoderLayer(cfg, self.dtype, self.attention_impl, name=f"layers_{i}")(x)
            hidden.append(x)
        if self.is_initializing():
            ln("post_layernorm")(x[:, 0])  # pooled-output norm: unused by LLaVA, kept for round trips
        return [hidden[i] for i in wanted]
