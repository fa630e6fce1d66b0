"""Jitted decoding with a KV cache: one prefill, then one compiled decode step inside `lax.while_loop`.

The whole loop is a single XLA program per (batch, prompt length, max_new_tokens, sampling settings):
tokens never round-trip to the host, and nothing is recompiled per token. Prompts must be left-padded
(every row's last prompt token is real), as for transformers' `generate`.

Models with multimodal rotary (Qwen2-VL) return `rope_deltas` from the prefill; decode steps pass them
back, so generated tokens continue at the prompt's largest M-RoPE position + 1, + 2, ...
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from .models.configs import compute_dtype
from .models.llama import init_cache


@flax.struct.dataclass
class GenerateOutput:
    tokens: jax.Array  # [B, max_new_tokens]; after a row's eos (kept), pad_token_id
    num_generated: jax.Array  # [B] tokens up to and including eos
    steps: jax.Array  # decode steps actually run (the loop stops early when every row has finished)

    def trimmed(self) -> list[list[int]]:
        """Per-row generated ids, up to and including eos."""
        tokens, counts = np.asarray(self.tokens), np.asarray(self.num_generated)
        return [tokens[i, : counts[i]].tolist() for i in range(tokens.shape[0])]


def _as_variables(params_or_variables) -> dict:
    """Accept bare params or a full variables dict (params + lora/vacuum collections)."""
    if "params" in params_or_variables:
        return dict(params_or_variables)
    return {"params": params_or_variables}


def top_p_filter(logits, top_p: float):
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # number of tokens needed: first index where cumulative >= top_p, inclusive
    keep = jnp.sum(cumulative < top_p, axis=-1, keepdims=True) + 1
    threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _select(logits, rng, temperature: float, top_p: float):
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _generate_impl(
    model,
    variables,
    input_ids,
    attention_mask,
    pixel_values,
    image_grid_thw,
    rng,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pad_token_id: int,
    temperature: float,
    top_p: float,
    lora_mode: str,
    sharding=None,
):
    text_config = model.config.text
    b, t = input_ids.shape
    cache = init_cache(text_config, b, t + max_new_tokens, compute_dtype(model.config.dtype))
    if sharding is not None:  # [B, S, K, H]: batch over data x fsdp, kv heads over tensor
        shape = (b, t + max_new_tokens, text_config.num_key_value_heads, text_config.head_dim)
        cache = jax.lax.with_sharding_constraint(
            cache, sharding.sharding(("batch", "length", "kv_heads", "head_dim"), shape))
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
    # Only models with a grid input (Qwen2-VL) accept image_grid_thw; None is static under jit.
    grid = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
    out = model.apply(
        variables,
        input_ids=input_ids,
        attention_mask=mask,
        pixel_values=pixel_values,
        cache=cache,
        cache_index=0,
        lora_mode=lora_mode,
        logits_to_keep=1,  # only the last position picks the first token
        **grid,
    )
    rope_deltas = getattr(out, "rope_deltas", None)
    step_kwargs = {} if rope_deltas is None else {"rope_deltas": rope_deltas}
    rng, step_rng = jax.random.split(rng)
    first = _select(out.logits[:, -1], step_rng, temperature, top_p)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)
    counts = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, counts, done, cache, mask, rng = state
        slot = t + step - 1  # cache slot of the token being fed
        mask = jax.lax.dynamic_update_slice(mask, jnp.ones((b, 1), jnp.int32), (0, slot))
        prev = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
        out = model.apply(
            variables,
            input_ids=prev,
            attention_mask=mask,
            cache=cache,
            cache_index=slot,
            lora_mode=lora_mode,
            **step_kwargs,
        )
        rng, step_rng = jax.random.split(rng)
        nxt = _select(out.logits[:, -1], step_rng, temperature, top_p)
        nxt = jnp.where(done, pad_token_id, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        counts = counts + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos)
        return step + 1, tokens, counts, done, out.cache, mask, rng

    state = (jnp.asarray(1, jnp.int32), tokens, counts, done, out.cache, mask, rng)
    steps, tokens, counts, *_ = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens=tokens, num_generated=counts, steps=steps)


_STATIC = ("model", "max_new_tokens", "eos_ids", "pad_token_id", "temperature", "top_p", "lora_mode")
_generate = jax.jit(_generate_impl, static_argnames=_STATIC)


@functools.lru_cache(maxsize=32)
def _sharded_generate(model, sharding, max_new_tokens, eos_ids, pad_token_id, temperature, top_p, lora_mode):
    """`_generate` as a jit with explicit shardings: variables by the parameter rules, prompts and images
    over `batch`, the KV cache constrained to (batch, kv heads); outputs replicated, so every process can
    read them."""
    static = dict(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_token_id=pad_token_id,
                  temperature=temperature, top_p=top_p, lora_mode=lora_mode)

    def fn(variables, input_ids, attention_mask, pixel_values, image_grid_thw, rng):
        return _generate_impl(model, variables, input_ids, attention_mask, pixel_values, image_grid_thw, rng,
                              sharding=sharding, **static)

    def in_shardings(variables, input_ids, attention_mask, pixel_values, image_grid_thw, rng):
        data = sharding.batch((input_ids, attention_mask, pixel_values, image_grid_thw))
        return (sharding.tree(variables), *data, sharding.replicated)

    return sharding.jit(fn, in_shardings, sharding.replicated)


def generate(
    model,
    params,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    *,
    image_grid_thw=None,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    lora_mode: str = "added",
    sharding=None,
) -> GenerateOutput:
    """Greedy (temperature=0) or sampled decoding.

    params: the model's params, or a variables dict with extra collections (e.g. "lora", "vacuum").
    image_grid_thw: Qwen2-VL's per-image grid (from its processor), with its pixel_values.
    eos_token_id defaults to the model config's. Sampling needs an explicit `rng`.
    sharding: a `parallel.Sharder`: the whole decode program runs sharded over its mesh.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    mask_np = np.asarray(attention_mask)
    if mask_np.shape != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {mask_np.shape} != input_ids shape {tuple(input_ids.shape)}")
    if not mask_np[:, -1].all():
        raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: rng=jax.random.key(seed)")
    text = model.config.text
    if eos_token_id is None:
        eos_token_id = text.eos_token_id
    eos_ids = tuple(int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) if e is not None)
    if pad_token_id is None:
        pad_token_id = text.pad_token_id if text.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    static = dict(max_new_tokens=int(max_new_tokens), eos_ids=eos_ids, pad_token_id=int(pad_token_id),
                  temperature=float(temperature), top_p=float(top_p), lora_mode=lora_mode)
    args = (
        _as_variables(params),
        input_ids,
        jnp.asarray(attention_mask, jnp.int32),
        None if pixel_values is None else jnp.asarray(pixel_values),
        None if image_grid_thw is None else jnp.asarray(image_grid_thw, jnp.int32),
        jax.random.PRNGKey(0) if rng is None else rng,
    )
    if sharding is not None:  # host arrays go straight to their shards (each process copies its own)
        host = lambda x, dtype=None: None if x is None else np.asarray(x, dtype)
        args = (args[0], host(input_ids, np.int32), host(attention_mask, np.int32), host(pixel_values),
                host(image_grid_thw, np.int32), args[5])
        return _sharded_generate(model, sharding, **static)(*args)
    return _generate(model, *args, **static)


def generate_batch(model, params, batch: dict, processor, **kwargs) -> GenerateOutput:
    """`generate` on a processor's left-padded batch (image inputs, eos and pad ids taken from them)."""
    return generate(
        model,
        params,
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
        eos_token_id=processor.eos_token_id,
        pad_token_id=processor.pad_token_id,
        **kwargs,
    )
