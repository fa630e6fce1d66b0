"""Rotary position embeddings (RoPE) matching transformers 5.x Llama.

A numpy/JAX port of `transformers.modeling_rope_utils` (`ROPE_INIT_FUNCTIONS`, `dynamic_rope_update`) and
`LlamaRotaryEmbedding`. The static inverse frequencies are computed once in numpy, mirroring the float32
operation order of the torch code so the frequencies agree bit for bit in practice (positions multiply them,
so one ulp at position 10^4 is already ~1e-3 rad). The position-dependent parts ("dynamic" NTK growth,
"longrope" short/long switch) are expressed with `jnp.where` so they trace under `jax.jit`.

HF's dynamic update is stateful (a module that grew keeps its grown frequencies until a short sequence
resets it). `rotary_cos_sin` is stateless and reproduces a freshly built HF module on every call.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_ROPE_THETA = 10000.0
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
# Types for which HF moves the pretraining length into `rope_parameters` (standardize_rope_params).
_TYPES_WITH_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
_F32 = np.float32


# ----------------------------------------------------------------------------------------------------------
# Config normalisation
# ----------------------------------------------------------------------------------------------------------


def rope_parameters_from_hf(hf_text_config: Mapping[str, Any]) -> dict:
    """Normalise a HF text config (config.json dict) into a flat rope-parameters dict.

    Mirrors `RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` + `standardize_rope_params` as they
    are applied by the time HF computes frequencies: legacy `rope_scaling` wins over `rope_parameters`,
    values inside the dict win over top-level `rope_theta` / `partial_rotary_factor`, legacy `type` becomes
    `rope_type`, and for llama3/yarn/longrope a top-level `original_max_position_embeddings` (Phi3 style)
    overrides, else it defaults to `max_position_embeddings`.
    """
    cfg = dict(hf_text_config)
    source = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(source, Mapping):
        raise ValueError(f"rope parameters must be a dict, got {type(source).__name__}")
    if any(isinstance(v, Mapping) for v in source.values()):
        # Per-layer-type rope (Gemma3-style nesting) is not a Llama feature.
        raise ValueError(f"nested per-layer rope_parameters are not supported: {sorted(source)}")
    params = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in source.items()}

    if params.get("rope_theta") is None:
        theta = cfg.get("rope_theta")
        params["rope_theta"] = float(theta) if theta is not None else DEFAULT_ROPE_THETA
    if cfg.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])

    legacy_type = params.pop("type", None)
    if params.get("rope_type") is None:
        params["rope_type"] = legacy_type or "default"

    if params["rope_type"] in _TYPES_WITH_ORIGINAL_MAX:
        if cfg.get("original_max_position_embeddings") is not None:
            # HF gives a top-level value priority (it re-standardises before every frequency computation).
            params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        elif params.get("original_max_position_embeddings") is None:
            if cfg.get("max_position_embeddings") is None:
                raise ValueError(
                    f"rope_type {params['rope_type']!r} needs original_max_position_embeddings or "
                    "max_position_embeddings in the config"
                )
            params["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    return params


# ----------------------------------------------------------------------------------------------------------
# Static inverse frequencies (numpy, float32 like torch)
# ----------------------------------------------------------------------------------------------------------


def _pow_f32(base: float, exponent: np.ndarray) -> np.ndarray:
    """float32(base) ** exponent, correctly rounded to float32.

    torch's float32 pow is (nearly always) correctly rounded; numpy's float32 pow is not, so go via float64.
    """
    return (np.float64(_F32(base)) ** exponent.astype(np.float64)).astype(_F32)


def _exponents(dim: int, denom: int | None = None) -> np.ndarray:
    """arange(0, dim, 2) / denom in float32, as `torch.arange(...).float() / dim`."""
    return np.arange(0, dim, 2).astype(_F32) / _F32(denom if denom is not None else dim)


def _inv_freq(base: float, dim: int) -> np.ndarray:
    return _F32(1.0) / _pow_f32(base, _exponents(dim))


def _require(params: Mapping[str, Any], key: str) -> Any:
    value = params.get(key)
    if value is None:
        raise ValueError(f"rope_type {params.get('rope_type')!r} requires rope_parameters[{key!r}]")
    return value


def _partial_rotary_factor(params: Mapping[str, Any], partial_rotary_factor: float) -> float:
    # HF reads the factor from rope_parameters; the argument is the fallback for dicts without it.
    in_dict = params.get("partial_rotary_factor")
    if in_dict is None:
        return float(partial_rotary_factor)
    if partial_rotary_factor != 1.0 and float(partial_rotary_factor) != float(in_dict):
        raise ValueError(
            f"partial_rotary_factor={partial_rotary_factor} conflicts with rope_parameters value {in_dict}"
        )
    return float(in_dict)


def _rope_type(params: Mapping[str, Any]) -> str:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; expected one of {list(ROPE_TYPES)}")
    return rope_type


def _original_max(params: Mapping[str, Any], max_position_embeddings: int) -> int:
    # Same fallback as HF's standardize_rope_params for dicts that were not normalised first.
    value = params.get("original_max_position_embeddings")
    return int(value if value is not None else max_position_embeddings)


def _yarn(params, dim, max_position_embeddings):
    base = float(params["rope_theta"])
    original_max = _original_max(params, max_position_embeddings)
    factor = params.get("factor")
    if factor is None:  # DeepSeek-V3 style: the factor is implied by the two lengths
        factor = max_position_embeddings / original_max
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as HF does

    pos_freqs = _pow_f32(base, _exponents(dim))
    inv_extrapolation = _F32(1.0) / pos_freqs
    inv_interpolation = _F32(1.0) / (_F32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low), 0, 1).astype(_F32)
    extrapolation_factor = _F32(1.0) - ramp
    inv_freq = (
        inv_interpolation * (_F32(1.0) - extrapolation_factor) + inv_extrapolation * extrapolation_factor
    )
    return inv_freq, float(attention_factor)


def _longrope_attention_factor(params, max_position_embeddings):
    original_max = _original_max(params, max_position_embeddings)
    factor = params.get("factor")
    if factor is None:  # Phi3 style: ratio of the two lengths
        factor = max_position_embeddings / original_max
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    return float(attention_factor)


def _longrope_inv_freq(params, dim, key):
    ext_factors = np.asarray(_require(params, key), dtype=_F32)
    exponents = _exponents(dim)
    if ext_factors.shape != exponents.shape:
        raise ValueError(f"rope_parameters[{key!r}] must have {exponents.size} entries, got {ext_factors.size}")
    return _F32(1.0) / (ext_factors * _pow_f32(float(params["rope_theta"]), exponents))


def _llama3(params, dim, max_position_embeddings):
    inv_freq = _inv_freq(float(params["rope_theta"]), dim)
    factor = _F32(_require(params, "factor"))
    low_freq_factor = float(_require(params, "low_freq_factor"))
    high_freq_factor = float(_require(params, "high_freq_factor"))
    old_context_len = _original_max(params, max_position_embeddings)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    # torch evaluates `scalar / tensor` as `reciprocal(tensor) * scalar` (Tensor.__rtruediv__); mirror it,
    # a plain division differs by an ulp.
    wavelen = (_F32(1.0) / inv_freq) * _F32(2 * math.pi)
    # Long wavelengths are interpolated by `factor`, short ones untouched, the band between blended.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = ((_F32(1.0) / wavelen) * _F32(old_context_len) - _F32(low_freq_factor)) / _F32(
        high_freq_factor - low_freq_factor
    )
    smoothed = (_F32(1.0) - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(_F32), 1.0


def rope_init(
    rope_parameters: Mapping[str, Any],
    head_dim: int,
    max_position_embeddings: int,
    partial_rotary_factor: float = 1.0,
) -> tuple[np.ndarray, float]:
    """Static (init-time) inverse frequencies and attention scaling, as HF's `ROPE_INIT_FUNCTIONS`.

    Returns `(inv_freq, attention_scaling)` with `inv_freq` float32 of shape `[rotary_dim // 2]`
    (`rotary_dim = int(head_dim * partial_rotary_factor)`; "proportional" always spans `head_dim`).
    For "dynamic" this is the unscaled set and for "longrope" the short-factor set, i.e. what HF holds
    before any forward pass. `partial_rotary_factor` in `rope_parameters` takes precedence, as in HF.
    """
    rope_type = _rope_type(rope_parameters)
    params = dict(rope_parameters)
    if params.get("rope_theta") is None:
        params["rope_theta"] = DEFAULT_ROPE_THETA
    base = float(params["rope_theta"])
    prf = _partial_rotary_factor(params, partial_rotary_factor)
    dim = int(head_dim * prf)

    if rope_type == "default":
        return _inv_freq(base, dim), 1.0
    if rope_type == "linear":
        # Scaling positions by 1/factor == scaling the frequencies.
        return _inv_freq(base, dim) / _F32(_require(params, "factor")), 1.0
    if rope_type == "dynamic":
        factor = float(_require(params, "factor"))
        # At init HF evaluates the NTK formula at seq_len = max_position_embeddings (a no-op rescale).
        ratio = factor * max_position_embeddings / max_position_embeddings - (factor - 1)
        return _inv_freq(base * ratio ** (dim / (dim - 2)), dim), 1.0
    if rope_type == "yarn":
        return _yarn(params, dim, max_position_embeddings)
    if rope_type == "longrope":
        return (
            _longrope_inv_freq(params, dim, "short_factor"),
            _longrope_attention_factor(params, max_position_embeddings),
        )
    if rope_type == "llama3":
        return _llama3(params, dim, max_position_embeddings)
    # proportional: rotate the first `partial_rotary_factor` of head_dim's angle pairs, zero (NoPE) the rest,
    # with exponents over the full head_dim.
    rope_angles = int(prf * head_dim // 2)
    rotated = _F32(1.0) / _pow_f32(base, _exponents(2 * rope_angles, denom=head_dim))
    inv_freq = np.concatenate([rotated, np.zeros(head_dim // 2 - rope_angles, _F32)])
    return inv_freq / _F32(params.get("factor", 1.0)), 1.0


# ----------------------------------------------------------------------------------------------------------
# cos / sin (JAX, jit-compatible)
# ----------------------------------------------------------------------------------------------------------


def _dynamic_inv_freq(params, dim, max_position_embeddings, seq_len):
    """NTK-scaled frequencies for a traced `seq_len`, float32 in HF's operation order."""
    factor = float(params["factor"])
    seq = jnp.maximum(seq_len, max_position_embeddings).astype(jnp.float32)
    ratio = (jnp.float32(factor) * seq) / jnp.float32(max_position_embeddings) - jnp.float32(factor - 1)
    base = jnp.float32(float(params["rope_theta"])) * ratio ** jnp.float32(dim / (dim - 2))
    return jnp.float32(1.0) / base ** jnp.asarray(_exponents(dim))


def rotary_cos_sin(
    rope_parameters: Mapping[str, Any],
    head_dim: int,
    max_position_embeddings: int,
    position_ids: jax.Array,
    partial_rotary_factor: float = 1.0,
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape `[B, T, rotary_dim]` (rotate_half layout), times attention scaling.

    Equals a freshly built HF `LlamaRotaryEmbedding(config)(x, position_ids)`; `position_ids` may be traced.
    As in HF, `seq_len = max(position_ids) + 1` over the whole batch selects the frequencies:
    "dynamic" grows its NTK base past `max_position_embeddings`; "longrope" switches to `long_factor`
    past `original_max_position_embeddings`.
    """
    inv_freq_np, attention_scaling = rope_init(
        rope_parameters, head_dim, max_position_embeddings, partial_rotary_factor
    )
    rope_type = _rope_type(rope_parameters)
    position_ids = jnp.asarray(position_ids)
    inv_freq = jnp.asarray(inv_freq_np)

    if rope_type in ("dynamic", "longrope"):
        seq_len = jnp.max(position_ids) + 1
        params = dict(rope_parameters)
        if params.get("rope_theta") is None:
            params["rope_theta"] = DEFAULT_ROPE_THETA
        dim = int(head_dim * _partial_rotary_factor(params, partial_rotary_factor))
        if rope_type == "dynamic":
            grown = _dynamic_inv_freq(params, dim, max_position_embeddings, seq_len)
            inv_freq = jnp.where(seq_len > max_position_embeddings, grown, inv_freq)
        else:
            long_inv_freq = jnp.asarray(_longrope_inv_freq(params, dim, "long_factor"))
            original_max = _original_max(params, max_position_embeddings)
            inv_freq = jnp.where(seq_len > original_max, long_inv_freq, inv_freq)

    freqs = position_ids[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb) * jnp.float32(attention_scaling)
    sin = jnp.sin(emb) * jnp.float32(attention_scaling)
    return cos.astype(dtype), sin.astype(dtype)
