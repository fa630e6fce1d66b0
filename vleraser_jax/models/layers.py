"""Building blocks shared by every model: norms, rotary, the attention op, the gated FFN with its hooks.

Einsum axis letters used throughout:
  B batch, T query positions, S key positions, N query heads, K key/value heads, G = N // K query heads per
  key/value head, H head dim, D model width, F FFN width (d_ff), R LoRA rank, U retained-basis rank.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACT2FN = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str):
    try:
        return ACT2FN[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACT2FN)}") from None


class RMSNorm(nn.Module):
    """Llama RMSNorm: statistics in f32, cast back to the input dtype before the weight (as transformers)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        input_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * x32.astype(input_dtype)).astype(self.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """x: [B, T, N, H]; cos/sin: [B, T, H] in transformers' rotate_half layout (no q/k permutation)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def attention(q, k, v, mask=None, *, scale: float, impl: str = "reference"):
    """Scaled dot-product attention with grouped key/value heads.

    q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0; mask: bool, broadcastable to [B, 1, T, S]
    (True = attend). Returns [B, T, N, H]. Softmax runs in f32 for every backend.

    impl: "reference" (plain einsums, the parity oracle), "xla" or "cudnn"
    (`jax.nn.dot_product_attention`; "cudnn" selects the fused flash kernel on NVIDIA GPUs).
    """
    if impl == "reference":
        b, t, n, h = q.shape
        kv_heads = k.shape[2]
        qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
        logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)
    if impl in ("xla", "cudnn"):
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
    raise ValueError(f"unknown attention impl {impl!r}; expected 'reference', 'xla' or 'cudnn'")


def vacuum_project(x, projector):
    """P x for a vacuum-space projector (DESIGN §4), on the last axis of x.

    projector: {"basis": U [F, U]} meaning P = I - U Uᵀ (compact, for U < F/2), or {"dense": P [F, F]}.
    """
    if "basis" in projector:
        basis = projector["basis"].astype(x.dtype)
        return x - jnp.einsum("...u,fu->...f", jnp.einsum("...f,fu->...u", x, basis), basis)
    return jnp.einsum("...f,fg->...g", x, projector["dense"].astype(x.dtype))


def lora_delta(x, lora, projector=None):
    """scale · B A P x, written row-wise as scale · ((P x) a) b with a = Aᵀ [F, R], b = Bᵀ [R, D]."""
    if projector is not None:
        x = vacuum_project(x, projector)
    return _low_rank(x, lora["a"].astype(x.dtype), lora["b"].astype(x.dtype), lora["scale"].astype(x.dtype))


@jax.custom_vjp
def _low_rank(x, a, b, scale):
    """((x a) b) · scale. Its backward is written out: autodiff's left the weight gradients as row-contracting
    dots behind a transpose copy of the cotangent, 6x slower on XLA:CPU, a quarter of an NPO step with LoRA on
    every linear (bench/npo_breakdown.py)."""
    return jnp.einsum("...r,rd->...d", jnp.einsum("...f,fr->...r", x, a), b) * scale


def _low_rank_forward(x, a, b, scale):
    low = jnp.einsum("...f,fr->...r", x, a)
    return jnp.einsum("...r,rd->...d", low, b) * scale, (x, a, b, scale, low)


def _low_rank_backward(residuals, g):
    x, a, b, scale, low = residuals
    rows_x, rows_g, rows_low = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), low.reshape(-1, low.shape[-1])
    d_low = jnp.einsum("nd,rd->nr", rows_g, b) * scale
    grad_a = jnp.einsum("nf,nr->fr", rows_x, d_low)
    grad_b = jnp.einsum("nr,nd->rd", rows_low, rows_g) * scale
    grad_x = jnp.einsum("nr,fr->nf", d_low, a).reshape(x.shape)
    grad_scale = jnp.sum(jnp.einsum("nr,rd->nd", rows_low, b) * rows_g).reshape(jnp.shape(scale))
    return grad_x, grad_a, grad_b, grad_scale.astype(scale.dtype)


_low_rank.defvjp(_low_rank_forward, _low_rank_backward)


def _linear_rows(x, kernel):
    """x [..., in] · kernel [in, out], on x flattened to rows: autodiff then derives the weight gradient as one
    [rows, in]ᵀ [rows, out] dot; from the batched einsum it was a library fusion behind a transpose copy, 1.2x
    slower per full fine-tune step on XLA:CPU (bench/linear_layout.py)."""
    rows = x.reshape(-1, x.shape[-1])
    return jnp.einsum("ni,io->no", rows, kernel).reshape(*x.shape[:-1], kernel.shape[-1])


LORA_MODES = ("added", "replaced")
_PROJECTOR_KEYS = ("basis", "dense")


class Dense(nn.Module):
    """`nn.Dense` (same parameter names and layout) with a functional LoRA hook.

    When the "lora" collection holds {"a", "b", "scale"} at this module's path, the output gains
    scale · B A P x, P being the "vacuum" collection's projector at the same path (identity if absent).
    `lora_mode="replaced"` returns only the LoRA path (plus the bias): the student in place of W.
    """

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, lora_mode: str = "added"):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        x = x.astype(self.dtype)
        y = _linear_rows(x, kernel.astype(self.dtype))
        if self.has_variable("lora", "a"):
            lora = {k: self.get_variable("lora", k) for k in ("a", "b", "scale")}
            projector = {k: self.get_variable("vacuum", k) for k in _PROJECTOR_KEYS if self.has_variable("vacuum", k)}
            delta = lora_delta(x, lora, projector or None)
            if lora_mode == "added":
                y = y + delta
            elif lora_mode == "replaced":
                y = delta
            else:
                raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {lora_mode!r}")
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class GatedMLP(nn.Module):
    """SwiGLU FFN y = W_down (act(W_gate x) * W_up x) with the hooks the unlearning methods need.

    - sows the key h = act(W_gate x) * (W_up x) as intermediates["ffn_key"] (stored only with
      `mutable=["intermediates"]`);
    - every projection is a LoRA-aware `Dense`; VL-Eraser puts its LoRA on down_proj behind the vacuum
      projector, and `lora_mode` ("added" / "replaced") applies to down_proj, the FFN's output matrix.
    """

    hidden_size: int
    intermediate_size: int
    act: str = "silu"
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, lora_mode: str = "added"):
        dense = lambda features, name: Dense(features, use_bias=self.use_bias, dtype=self.dtype, name=name)
        key = activation(self.act)(dense(self.intermediate_size, "gate_proj")(x)) * dense(
            self.intermediate_size, "up_proj"
        )(x)
        self.sow("intermediates", "ffn_key", key)
        down = dense(self.hidden_size, "down_proj")
        return down(key, lora_mode)


def causal_mask(query_slots, num_slots: int, attention_mask=None):
    """Boolean [B|1, 1, T, S]: key slot s is visible from query slot t iff s <= t and s is not padding."""
    key_slots = jnp.arange(num_slots)
    mask = key_slots[None, None, None, :] <= query_slots[..., None]
    mask = mask.reshape(1, 1, query_slots.shape[-1], num_slots)
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    return mask


def positions_from_mask(attention_mask):
    """Position ids that skip left padding: cumsum(mask) - 1, clamped at 0 (as transformers' generate)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
