"""Llama / Qwen2 decoder (one module; config flags select q/k/v biases) with a functional KV cache.

The cache is an explicit pytree `{"layers_i": {"k": [B, S, K, H], "v": [B, S, K, H]}}` passed in and returned,
so prefill and decode steps are pure functions that `jax.jit` compiles once per shape.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from .configs import TextConfig
from .layers import Dense, GatedMLP, RMSNorm, apply_rotary, attention, causal_mask, positions_from_mask
from .rope import rotary_cos_sin


@flax.struct.dataclass
class CausalLMOutput:
    logits: jax.Array
    cache: Any = None
    last_hidden_state: jax.Array | None = None


def init_cache(config: TextConfig, batch_size: int, max_length: int, dtype=jnp.float32) -> dict:
    shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
    return {
        f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for i in range(config.num_hidden_layers)
    }


class Attention(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=None):
        cfg = self.config
        dense = lambda features, bias, name: Dense(features, use_bias=bias, dtype=self.dtype, name=name)
        b, t, _ = x.shape
        q = dense(cfg.num_attention_heads * cfg.head_dim, cfg.qkv_bias, "q_proj")(x)
        k = dense(cfg.num_key_value_heads * cfg.head_dim, cfg.qkv_bias, "k_proj")(x)
        v = dense(cfg.num_key_value_heads * cfg.head_dim, cfg.qkv_bias, "v_proj")(x)
        q = apply_rotary(q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim), cos, sin)
        k = apply_rotary(k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
        v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        new_cache = None
        if layer_cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
            new_cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        out = attention(q, k, v, mask, scale=cfg.head_dim**-0.5, impl=self.attention_impl)
        out = dense(cfg.hidden_size, cfg.o_bias, "o_proj")(out.reshape(b, t, -1))
        return out, new_cache


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=None, lora_mode="added"):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, new_cache = Attention(cfg, self.dtype, self.attention_impl, name="self_attn")(
            h, cos, sin, mask, layer_cache, cache_index
        )
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        h = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias, self.dtype, name="mlp")(
            h, lora_mode
        )
        return x + h, new_cache


# nn.remat policies by name: what a layer keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = {
    "full": None,  # only the layer's inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # every matmul output
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls, not attention
}


def decoder_layer_class(remat: str = "none"):
    """DecoderLayer, or its nn.remat version (same parameter names, so checkpoints are unaffected)."""
    if remat == "none":
        return DecoderLayer
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be 'none' or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    # static: lora_mode (argument 7, counting self) selects code paths
    return nn.remat(DecoderLayer, policy=REMAT_POLICIES[remat], static_argnums=(7,))


class CausalLM(nn.Module):
    """Decoder + LM head. `embed` is separate so multimodal wrappers can splice image features in."""

    config: TextConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"
    remat: str = "none"

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32)
        layer = decoder_layer_class(self.remat)
        self.layers = [layer(cfg, self.dtype, self.attention_impl) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype)

    def embed(self, input_ids):
        # Out-of-vocabulary placeholder ids (e.g. an image token past the vocab) are clamped here and
        # overwritten by the caller.
        return self.embed_tokens(jnp.clip(input_ids, 0, self.config.vocab_size - 1))

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        position_embeddings=None,
        cache=None,
        cache_index=None,
        lora_mode: str = "added",
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids [B, T] or inputs_embeds [B, T, D]; attention_mask [B, T], or [B, S] covering the whole cache.

        Without `position_ids`, positions follow the attention mask (left padding is skipped), else 0..T-1.
        `position_embeddings=(cos, sin)` overrides the rotary tables (used by M-RoPE).
        With `cache`, the new keys/values are written at `cache_index` and the returned output carries the
        updated cache. `logits_to_keep` (as in transformers): 0 computes logits at every position, N > 0 at the
        last N only (a prefill needs one; the vocabulary product is a fifth of a tiny model's forward).
        """
        cfg = self.config
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        x = inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        if cache is not None:
            num_slots = next(iter(cache.values()))["k"].shape[1]
            cache_index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        else:
            num_slots, cache_index = t, jnp.asarray(0, jnp.int32)
        query_slots = cache_index + jnp.arange(t)
        if attention_mask is not None and attention_mask.shape[-1] != num_slots:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} positions; expected {num_slots} "
                "(the sequence length, or the cache length when a cache is given)"
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = jax.lax.dynamic_slice_in_dim(positions_from_mask(attention_mask), cache_index, t, 1)
            else:
                position_ids = jnp.broadcast_to(query_slots, (b, t))
        if position_embeddings is None:
            position_embeddings = rotary_cos_sin(
                cfg.rope_parameters, cfg.head_dim, cfg.max_position_embeddings, position_ids
            )
        cos, sin = position_embeddings
        mask = causal_mask(query_slots, num_slots, attention_mask)
        new_cache = {} if cache is not None else None
        for i, layer in enumerate(self.layers):
            layer_cache = cache[f"layers_{i}"] if cache is not None else None
            x, updated = layer(x, cos, sin, mask, layer_cache, cache_index, lora_mode)
            if cache is not None:
                new_cache[f"layers_{i}"] = updated
        x = self.norm(x)
        kept = x[:, -logits_to_keep:] if logits_to_keep else x
        logits = self.embed_tokens.attend(kept) if cfg.tie_word_embeddings else self.lm_head(kept)
        return CausalLMOutput(logits=logits, cache=new_cache, last_hidden_state=x)
