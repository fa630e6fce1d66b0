"""LLaVA-1.5: CLIP vision tower -> projector -> Llama decoder, image features spliced at image tokens.

Parameter tree: {"vision": CLIP tower, "projector": {"linear_1", "linear_2"}, "llm": decoder + head}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .clip_vision import CLIPVisionTower
from .configs import LlavaConfig, compute_dtype
from .layers import Dense, activation
from .llama import CausalLM, CausalLMOutput


class LlavaProjector(nn.Module):
    hidden_size: int
    act: str = "gelu"
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: Dense(self.hidden_size, use_bias=self.use_bias, dtype=self.dtype, name=name)
        return dense("linear_2")(activation(self.act)(dense("linear_1")(x)))


def concrete_or_none(x):
    """The value of x as numpy if it is not being traced, else None (for eager-only input checks)."""
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def merge_image_features(input_ids, inputs_embeds, image_features, image_token_index: int):
    """Write image_features [I, P, D] into the positions of `image_token_index`, in reading order.

    Jit-friendly equivalent of transformers' masked_scatter: the k-th image token of the flattened batch
    takes the k-th feature row.
    """
    b, t, d = inputs_embeds.shape
    rows = image_features.reshape(-1, d)
    is_image = input_ids == image_token_index
    ids = concrete_or_none(input_ids)
    if ids is not None and int((ids == image_token_index).sum()) != rows.shape[0]:
        raise ValueError(
            f"input_ids hold {int((ids == image_token_index).sum())} image tokens (id {image_token_index}) but "
            f"pixel_values give {image_features.shape[0]} image(s) x {image_features.shape[1]} features = "
            f"{rows.shape[0]}; each image needs exactly {image_features.shape[1]} image tokens"
        )
    order = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, rows.shape[0] - 1)
    gathered = rows[order].reshape(b, t, d).astype(inputs_embeds.dtype)
    return jnp.where(is_image[..., None], gathered, inputs_embeds)


class LlavaForConditionalGeneration(nn.Module):
    config: LlavaConfig

    def setup(self):
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        self.vision = CLIPVisionTower(cfg.vision, dtype, cfg.attention_impl)
        self.projector = LlavaProjector(
            cfg.text.hidden_size, cfg.projector_hidden_act, cfg.multimodal_projector_bias, dtype
        )
        self.llm = CausalLM(cfg.text, dtype, cfg.attention_impl, cfg.remat)

    def get_image_features(self, pixel_values):
        """pixel_values [I, C, H, W] -> (selected vision features [I, P, Dv·L], projected [I, P, D])."""
        cfg = self.config
        hidden = self.vision(pixel_values, cfg.feature_layers)
        if cfg.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]  # drop the class token
        selected = jnp.concatenate(hidden, axis=-1)
        return selected, self.projector(selected)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        position_ids=None,
        cache=None,
        cache_index=None,
        lora_mode: str = "added",
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Same inputs as the transformers processor output; returns `.logits` [B, T, V] (and `.cache`);
        `logits_to_keep` N > 0: logits of the last N positions only, [B, N, V].

        Text-only batches pass no pixel_values. During cached decoding pass pixel_values only at prefill.
        """
        embeds = self.llm.embed(input_ids)
        if pixel_values is not None:
            _, features = self.get_image_features(pixel_values)
            embeds = merge_image_features(input_ids, embeds, features, self.config.image_token_index)
        else:
            ids = concrete_or_none(input_ids)
            if ids is not None and cache is None and (ids == self.config.image_token_index).any():
                raise ValueError(
                    f"input_ids contain image tokens (id {self.config.image_token_index}) but no pixel_values were given"
                )
        return self.llm(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=embeds,
            cache=cache,
            cache_index=cache_index,
            lora_mode=lora_mode,
            logits_to_keep=logits_to_keep,
        )

    def dummy_inputs(self) -> dict:
        """The smallest inputs that touch every parameter (for init / eval_shape)."""
        cfg = self.config
        n = cfg.num_image_tokens
        ids = np.full((1, n + 2), cfg.image_token_index, np.int32)
        ids[0, 0] = ids[0, -1] = 0
        pixels = np.zeros((1, cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size), np.float32)
        return {"input_ids": ids, "pixel_values": pixels}
