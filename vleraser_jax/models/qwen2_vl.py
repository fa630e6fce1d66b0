"""Qwen2-VL: vision tower with patch merger -> Qwen2 decoder with multimodal rotary (M-RoPE).

Parameter tree: {"vision": Qwen2VisionTower, "llm": CausalLM}. Merged image features replace the
`image_token_id` positions; every position carries three rotary coordinates (temporal, height, width):
text tokens advance all three together, an image's tokens lay out its merged grid starting at the running
position, and text after an image resumes at start + max(grid rows, grid columns).

Einsum axis letters: B batch, T positions, I images, H head dim, Z = 3 rotary coordinates.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .configs import Qwen2VLConfig, TextConfig, compute_dtype
from .layers import positions_from_mask
from .llama import CausalLM
from .llava import concrete_or_none, merge_image_features
from .qwen2_vl_vision import Qwen2VisionTower
from .rope import rope_init


@flax.struct.dataclass
class Qwen2VLOutput:
    logits: jax.Array
    cache: Any = None
    last_hidden_state: jax.Array | None = None
    rope_deltas: jax.Array | None = None  # [B]: M-RoPE position minus cache slot, for decode steps


def get_rope_index(
    input_ids, attention_mask=None, image_grid_thw=None, *, image_token_id: int, spatial_merge_size: int
):
    """M-RoPE position ids [Z=3, B, T] and rope deltas [B], as transformers' `get_rope_index` (jit-friendly).

    Image tokens are the (unmasked) `image_token_id` positions; the k-th image token of the flattened batch
    belongs to the image whose merged-token span (t·h·w / m² each, `image_grid_thw` order) holds k. Padding
    gets position 0. rope_deltas = max position + 1 - number of real tokens, so a token in cache slot s
    continues at positions_from_mask(s) + delta.
    """
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    inc = valid.astype(jnp.int32)
    offset = jnp.zeros((3, b, t), jnp.int32)
    if image_grid_thw is not None:
        grid = jnp.asarray(image_grid_thw, jnp.int32)
        m = spatial_merge_size
        gt, gh, gw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
        ntok = gt * gh * gw
        ends = jnp.cumsum(ntok)
        is_img = (input_ids == image_token_id) & valid
        k = (jnp.cumsum(is_img.reshape(-1)) - 1).reshape(b, t)
        img = jnp.clip(jnp.searchsorted(ends, k, side="right", method="compare_all"), 0, grid.shape[0] - 1)
        j = k - (ends - ntok)[img]
        cols, frame = gw[img], gh[img] * gw[img]
        offset = jnp.where(is_img[None], jnp.stack([j // frame, (j % frame) // cols, j % cols]), 0)
        # An image moves the running position by max(rows, columns), charged on its last token.
        advance = jnp.maximum(gh, gw)[img]
        inc = jnp.where(is_img, jnp.where(j == ntok[img] - 1, advance, 0), inc)
    start = jnp.cumsum(inc, axis=1) - inc
    position_ids = jnp.where(valid[None], start[None] + offset, 0)
    rope_deltas = position_ids.max(axis=(0, 2)) + 1 - valid.sum(-1)
    return position_ids, rope_deltas.astype(jnp.int32)


def mrope_cos_sin(text: TextConfig, mrope_section, position_ids):
    """Rotary tables [B, T, H] from position ids [Z, B, T]: frequency pair i of section s turns with
    coordinate s % 3 (temporal, height, width, temporal, ...), in rotate_half layout."""
    inv_freq, scaling = rope_init(text.rope_parameters, text.head_dim, text.max_position_embeddings)
    freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [Z, B, T, H/2]
    coordinate = np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)])
    freqs = jnp.take_along_axis(freqs, jnp.asarray(coordinate)[None, None, None, :], axis=0)[0]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * jnp.float32(scaling), jnp.sin(emb) * jnp.float32(scaling)


class Qwen2VLForConditionalGeneration(nn.Module):
    config: Qwen2VLConfig

    def setup(self):
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        self.vision = Qwen2VisionTower(cfg.vision, dtype, cfg.attention_impl)
        self.llm = CausalLM(cfg.text, dtype, cfg.attention_impl, cfg.remat)

    def get_image_features(self, pixel_values, image_grid_thw):
        """-> (vision last hidden state [N, Dv], merged image features [N / m², D]) over all images in order."""
        return self.vision(pixel_values, image_grid_thw)

    def get_rope_index(self, input_ids, attention_mask=None, image_grid_thw=None):
        """See module-level `get_rope_index`."""
        return get_rope_index(
            input_ids,
            attention_mask,
            image_grid_thw,
            image_token_id=self.config.image_token_id,
            spatial_merge_size=self.config.vision.spatial_merge_size,
        )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        position_ids=None,
        rope_deltas=None,
        cache=None,
        cache_index=None,
        lora_mode: str = "added",
        logits_to_keep: int = 0,
    ) -> Qwen2VLOutput:
        """Same inputs as the Qwen2-VL processor output; returns `.logits` [B, T, V], `.rope_deltas` [B], `.cache`.

        position_ids: [3, B, T] (or [B, T], used for all three coordinates); by default computed from
        input_ids / attention_mask / image_grid_thw. With `cache`, attention_mask covers the whole cache.
        Decode steps pass the prefill's `rope_deltas` (and no pixel_values): their positions are then the
        mask-derived text positions shifted by it, as in transformers. `logits_to_keep` N > 0: logits of the
        last N positions only, [B, N, V].
        """
        cfg = self.config
        b, t = input_ids.shape
        embeds = self.llm.embed(input_ids)
        ids = concrete_or_none(input_ids)
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values need image_grid_thw (the processor returns both)")
            grid = concrete_or_none(image_grid_thw)
            if ids is not None and grid is not None:
                m = cfg.vision.spatial_merge_size
                n_tokens, n_features = int((ids == cfg.image_token_id).sum()), int(grid.prod(-1).sum()) // m**2
                if n_tokens != n_features:
                    raise ValueError(
                        f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}) but image_grid_thw "
                        f"{grid.tolist()} gives {n_features} merged image features (t·h·w / {m}² per image)"
                    )
            _, features = self.get_image_features(pixel_values, image_grid_thw)
            embeds = merge_image_features(input_ids, embeds, features[None], cfg.image_token_id)
        elif ids is not None and cache is None and (ids == cfg.image_token_id).any():
            raise ValueError(
                f"input_ids contain image tokens (id {cfg.image_token_id}) but no pixel_values were given"
            )

        # Traced (None) or non-zero: a decode step, whose M-RoPE positions depend on the prefill.
        start = 0 if cache is None or cache_index is None else concrete_or_none(cache_index)
        cache_index = jnp.asarray(0 if cache is None or cache_index is None else cache_index, jnp.int32)
        if position_ids is None:
            if rope_deltas is None:
                if start is None or int(start) != 0:
                    raise ValueError("a cached step after the prefill needs the prefill output's rope_deltas")
                mask = None if attention_mask is None else attention_mask[:, :t]
                position_ids, rope_deltas = self.get_rope_index(input_ids, mask, image_grid_thw)
            else:
                if attention_mask is not None:
                    text_positions = positions_from_mask(attention_mask)
                    text_positions = jax.lax.dynamic_slice_in_dim(text_positions, cache_index, t, 1)
                else:
                    text_positions = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
                position_ids = jnp.broadcast_to(text_positions + rope_deltas[:, None], (3, b, t))
        elif position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids, (3, b, t))
        cos, sin = mrope_cos_sin(cfg.text, cfg.mrope_section, position_ids)
        out = self.llm(
            attention_mask=attention_mask,
            inputs_embeds=embeds,
            position_embeddings=(cos, sin),
            cache=cache,
            cache_index=cache_index if cache is not None else None,
            lora_mode=lora_mode,
            logits_to_keep=logits_to_keep,
        )
        return Qwen2VLOutput(
            logits=out.logits, cache=out.cache, last_hidden_state=out.last_hidden_state, rope_deltas=rope_deltas
        )

    def dummy_inputs(self) -> dict:
        """The smallest inputs that touch every parameter: one image of a single merge block."""
        cfg = self.config
        m = cfg.vision.spatial_merge_size
        ids = np.array([[0, cfg.image_token_id, 0]], np.int32)
        pixels = np.zeros((m * m, cfg.vision.patch_dim), np.float32)
        return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": np.array([[1, m, m]], np.int32)}
