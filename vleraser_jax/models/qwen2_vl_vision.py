"""Qwen2-VL vision tower: Conv3d patch embedding, 2-D rotary, per-image attention, patch merger.

Inputs are what the Qwen2-VL image processor emits: `pixel_values` [N, C·t·p·p], the patches of every image
of the batch concatenated (each image's patches ordered block-major over merge_size x merge_size blocks),
and `image_grid_thw` [I, 3] = (frames, patch rows, patch columns) per image.

Einsum axis letters: N patches (all images), M merged tokens, D vision width, E merged width (D·m²),
F LM width, P flattened patch length, H head dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .configs import Qwen2VLVisionConfig
from .layers import Dense, activation, attention, rotate_half
from .rope import rope_init

_LN_EPS = 1e-6  # fixed in transformers (not a config field)


def vision_patch_layout(image_grid_thw, num_patches: int, merge_size: int):
    """Per-patch (frame segment id [N], row [N], column [N]) for the concatenated patches of all images.

    Each frame of each image is its own attention segment (as transformers' cu_seqlens). Rows/columns
    follow the processor's block-major order: patch r of a frame sits in merge block r // m², at offset
    r % m² inside it. Rows past the grids' total get segment -1. Jit-friendly: `image_grid_thw` may be traced.
    """
    grid = jnp.asarray(image_grid_thw, jnp.int32)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    sizes = t * h * w
    ends = jnp.cumsum(sizes)
    idx = jnp.arange(num_patches, dtype=jnp.int32)
    img = jnp.minimum(jnp.searchsorted(ends, idx, side="right", method="compare_all"), grid.shape[0] - 1)
    j = idx - (ends - sizes)[img]
    frame_size = (h * w)[img]
    frame, r = j // frame_size, j % frame_size
    segment = (jnp.cumsum(t) - t)[img] + frame
    segment = jnp.where(idx < ends[-1], segment, -1)
    m = merge_size
    blocks_per_row = w[img] // m
    block, offset = r // (m * m), r % (m * m)
    row = (block // blocks_per_row) * m + offset // m
    col = (block % blocks_per_row) * m + offset % m
    return segment, row, col


def vision_rotary_cos_sin(row, col, head_dim: int, theta: float):
    """2-D rotary tables [N, H]: the first half of each rotate_half pair set turns with the row, the second
    with the column (transformers' axial layout), over frequencies of a head_dim // 2 rotary."""
    inv_freq, _ = rope_init({"rope_type": "default", "rope_theta": theta}, head_dim // 2, 1)
    inv_freq = jnp.asarray(inv_freq)
    freqs = jnp.concatenate(
        [row[:, None].astype(jnp.float32) * inv_freq, col[:, None].astype(jnp.float32) * inv_freq], axis=-1
    )
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class PatchEmbed(nn.Module):
    """A Conv3d whose stride equals its kernel, over pre-cut patches, is one matmul: [N, P] x [P, D]."""

    config: Qwen2VLVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        proj = Dense(self.config.embed_dim, use_bias=False, dtype=self.dtype, name="proj")
        return proj(pixel_values.astype(self.dtype))


class VisionAttention(nn.Module):
    config: Qwen2VLVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        """x [N, D]; cos/sin [N, H]; mask bool [1, 1, N, N] (True = same frame)."""
        cfg = self.config
        n = x.shape[0]
        qkv = Dense(3 * cfg.embed_dim, dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(n, 3, cfg.num_heads, cfg.head_dim), 1, 0)

        def rotate(y):  # in f32, as transformers' apply_rotary_pos_emb_vision
            y32 = y.astype(jnp.float32)
            return (y32 * cos[:, None] + rotate_half(y32) * sin[:, None]).astype(y.dtype)

        q, k = rotate(q), rotate(k)
        out = attention(q[None], k[None], v[None], mask, scale=cfg.head_dim**-0.5, impl=self.attention_impl)
        return Dense(cfg.embed_dim, dtype=self.dtype, name="proj")(out.reshape(n, -1))


class VisionBlock(nn.Module):
    config: Qwen2VLVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg = self.config
        norm = lambda name: nn.LayerNorm(_LN_EPS, dtype=self.dtype, name=name)
        dense = lambda features, name: Dense(features, dtype=self.dtype, name=name)
        x = x + VisionAttention(cfg, self.dtype, self.attention_impl, name="attn")(norm("norm1")(x), cos, sin, mask)
        h = dense(cfg.mlp_dim, "fc1")(norm("norm2")(x))
        h = dense(cfg.embed_dim, "fc2")(activation(cfg.hidden_act)(h))
        return x + h


class PatchMerger(nn.Module):
    """LayerNorm, then each merge block's m² consecutive patches [m², D] -> one row [E] -> MLP -> [F]."""

    config: Qwen2VLVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        merged = cfg.embed_dim * cfg.spatial_merge_size**2
        x = nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="ln_q")(x).reshape(-1, merged)
        x = Dense(merged, dtype=self.dtype, name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return Dense(cfg.hidden_size, dtype=self.dtype, name="mlp_2")(x)


class Qwen2VisionTower(nn.Module):
    """pixel_values [N, P], image_grid_thw [I, 3] -> (last hidden state [N, D], merged features [N / m², F]).

    All images of a batch run as one sequence; a segment-id mask keeps attention inside each frame, so no
    image ever attends to another and nothing is padded or recompiled per image size.
    """

    config: Qwen2VLVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"

    @nn.compact
    def __call__(self, pixel_values, image_grid_thw):
        cfg = self.config
        n = pixel_values.shape[0]
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(
                f"pixel_values must be [num_patches, {cfg.patch_dim}] (C·t·p·p flattened patches, as the Qwen2-VL "
                f"processor emits), got shape {tuple(pixel_values.shape)}"
            )
        if n % cfg.spatial_merge_size**2:
            m = cfg.spatial_merge_size
            raise ValueError(f"{n} patches do not form whole {m}x{m} merge blocks")
        _check_grid(image_grid_thw, n, cfg.spatial_merge_size)
        segment, row, col = vision_patch_layout(image_grid_thw, n, cfg.spatial_merge_size)
        cos, sin = vision_rotary_cos_sin(row, col, cfg.head_dim, cfg.rope_theta)
        mask = (segment[:, None] == segment[None, :])[None, None]
        x = PatchEmbed(cfg, self.dtype, name="patch_embed")(pixel_values)
        for i in range(cfg.depth):
            x = VisionBlock(cfg, self.dtype, self.attention_impl, name=f"blocks_{i}")(x, cos, sin, mask)
        return x, PatchMerger(cfg, self.dtype, name="merger")(x)


def _check_grid(image_grid_thw, num_patches: int, merge_size: int) -> None:
    """Eager-only validation (skipped when the grid is traced)."""
    try:
        grid = np.asarray(image_grid_thw)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [num_images, 3], got shape {grid.shape}")
    if (grid[:, 1:] % merge_size).any():
        raise ValueError(f"image_grid_thw {grid.tolist()}: patch rows/columns must be multiples of {merge_size}")
    total = int(grid.prod(-1).sum())
    if total != num_patches:
        raise ValueError(
            f"image_grid_thw {grid.tolist()} implies {total} patches but pixel_values has {num_patches} rows"
        )
