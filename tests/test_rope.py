"""RoPE port vs transformers' own LlamaRotaryEmbedding (float32, CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from vleraser_jax.models.rope import rope_init, rope_parameters_from_hf, rotary_cos_sin  # noqa: E402

transformers.logging.set_verbosity_error()  # HF warns about deliberately odd tiny configs

HEAD_DIM = 16
TINY = dict(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM, num_hidden_layers=1,
            intermediate_size=32, vocab_size=32)
ATOL = 1e-5

SHORT = [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5]
LONG = [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0]

# (id, config.json-style fields). Mix of v5 `rope_parameters` and legacy `rope_theta` + `rope_scaling`.
CASES = {
    "default": dict(max_position_embeddings=128),
    "default-legacy-theta": dict(max_position_embeddings=128, rope_theta=500000.0),
    "linear": dict(max_position_embeddings=128, rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "linear-legacy": dict(max_position_embeddings=128, rope_theta=1e6,
                          rope_scaling={"type": "linear", "factor": 4.0}),
    "linear-partial": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "dynamic": dict(max_position_embeddings=64, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
    "dynamic-legacy": dict(max_position_embeddings=64, rope_theta=500000.0,
                           rope_scaling={"type": "dynamic", "factor": 3.0}),
    "dynamic-partial": dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "yarn": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "yarn-legacy-mscale": dict(max_position_embeddings=128, rope_theta=50000.0, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707,
        "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False}),
    "yarn-implicit-factor": dict(max_position_embeddings=256, original_max_position_embeddings=64,
                                 rope_parameters={"rope_type": "yarn", "factor": None,
                                                  "attention_factor": 1.25}),
    "longrope": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 4.0,
        "original_max_position_embeddings": 32}),
    "longrope-phi3": dict(max_position_embeddings=128, original_max_position_embeddings=32, rope_scaling={
        "type": "longrope", "short_factor": SHORT, "long_factor": LONG}),
    "llama3": dict(max_position_embeddings=1024, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256}),
    "llama3-v5": dict(max_position_embeddings=4096, rope_parameters={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
        "rope_theta": 500000.0, "original_max_position_embeddings": 512}),
    "proportional": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "factor": 2.0}),
}


def _rows(*starts_and_lengths):
    """Equal-length rows of consecutive positions with different starts: shape [B, T]."""
    return np.stack([np.arange(s, s + n) for s, n in starts_and_lengths]).astype(np.int64)


def _positions(case: str) -> list[np.ndarray]:
    cfg = CASES[case]
    common = [_rows((0, 24)), _rows((0, 24), (300, 24), (1000, 24))]
    if "dynamic" in case:
        # max_position_embeddings=64: below, exactly at, just past (growth), far past, mixed rows.
        return [_rows((0, 32)), _rows((0, 64)), _rows((0, 65)), _rows((0, 16), (180, 16)),
                _rows((0, 16), (40, 16)), _rows((0, 8), (600, 8))]
    if "longrope" in case:
        # original max 32: short set up to seq_len 32, long set past it (one far row drags the batch).
        return [_rows((0, 32)), _rows((0, 33)), _rows((0, 8), (100, 8)), _rows((0, 8), (10, 8))] + common
    return common


def hf_cos_sin(cfg: dict, position_ids: np.ndarray):
    """Fresh HF module per call: its dynamic state depends on call history, ours is stateless."""
    config = LlamaConfig.from_dict({**TINY, **cfg})
    rotary = LlamaRotaryEmbedding(config)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.as_tensor(position_ids))
    return cos.numpy(), sin.numpy(), rotary


def _make_jitted(case: str):
    cfg = CASES[case]
    params = rope_parameters_from_hf(cfg)
    # Positions are traced; the rope parameters are static Python.
    return jax.jit(lambda pos: rotary_cos_sin(params, HEAD_DIM, cfg["max_position_embeddings"], pos))


_jitted = functools.lru_cache(maxsize=None)(_make_jitted)


def max_abs_diff(case: str) -> float:
    worst = 0.0
    for pos in _positions(case):
        ref_cos, ref_sin, _ = hf_cos_sin(CASES[case], pos)
        cos, sin = _jitted(case)(jnp.asarray(pos, jnp.int32))
        assert cos.shape == ref_cos.shape and sin.shape == ref_sin.shape
        assert cos.dtype == jnp.float32
        worst = max(worst, float(np.abs(np.asarray(cos) - ref_cos).max()),
                    float(np.abs(np.asarray(sin) - ref_sin).max()))
    return worst


@pytest.mark.parametrize("case", sorted(CASES))
def test_cos_sin_match_hf(case):
    assert max_abs_diff(case) <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_init_matches_hf_buffers(case):
    cfg = CASES[case]
    _, _, rotary = hf_cos_sin(cfg, _rows((0, 4)))  # seq_len 4: no dynamic / long switch
    inv_freq, scaling = rope_init(rope_parameters_from_hf(cfg), HEAD_DIM, cfg["max_position_embeddings"])
    ref = rotary.original_inv_freq.numpy()
    assert inv_freq.dtype == np.float32 and inv_freq.shape == ref.shape
    np.testing.assert_allclose(inv_freq, ref, rtol=1e-6, atol=0)
    assert scaling == pytest.approx(rotary.attention_scaling, rel=1e-12)


def test_traced_selection_reuses_one_compilation():
    # Same shapes below / above the threshold: the switch must happen inside the compiled function.
    for case, below, above in [("dynamic", _rows((0, 10), (5, 10)), _rows((0, 10), (90, 10))),
                               ("longrope", _rows((0, 10), (5, 10)), _rows((0, 10), (90, 10)))]:
        fn = _make_jitted(case)  # fresh, so the cache count is ours alone
        for pos in (below, above, below):
            ref_cos, ref_sin, _ = hf_cos_sin(CASES[case], pos)
            cos, sin = fn(jnp.asarray(pos, jnp.int32))
            np.testing.assert_allclose(np.asarray(cos), ref_cos, atol=ATOL, rtol=0)
            np.testing.assert_allclose(np.asarray(sin), ref_sin, atol=ATOL, rtol=0)
        assert fn._cache_size() == 1


def test_dynamic_matches_hf_grow_then_reset():
    # On one HF module: growth past max positions, then a short batch resets to the original frequencies.
    cfg = CASES["dynamic"]
    rotary = LlamaRotaryEmbedding(LlamaConfig.from_dict({**TINY, **cfg}))
    for pos in (_rows((0, 16), (150, 16)), _rows((0, 16))):
        with torch.no_grad():
            ref_cos, _ = rotary(torch.zeros(1), torch.as_tensor(pos))
        cos, _ = _jitted("dynamic")(jnp.asarray(pos, jnp.int32))
        np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=ATOL, rtol=0)


def test_dtype_cast_and_scaling():
    params = rope_parameters_from_hf(CASES["yarn"])
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    cos32, sin32 = rotary_cos_sin(params, HEAD_DIM, 128, pos)
    cos16, _ = rotary_cos_sin(params, HEAD_DIM, 128, pos, dtype=jnp.bfloat16)
    assert cos16.dtype == jnp.bfloat16 and cos32.shape == (1, 8, HEAD_DIM)
    _, scaling = rope_init(params, HEAD_DIM, 128)
    assert scaling > 1.0  # yarn mscale
    np.testing.assert_allclose(np.asarray(cos32[0, 0]), scaling, rtol=1e-6)  # cos(0) * scaling
    np.testing.assert_allclose(np.asarray(cos16, np.float32), np.asarray(cos32), atol=1e-2)


def test_partial_rotary_factor_argument():
    params = {"rope_type": "default", "rope_theta": 10000.0}
    inv_freq, _ = rope_init(params, HEAD_DIM, 128, partial_rotary_factor=0.5)
    assert inv_freq.shape == (4,)
    cos, _ = rotary_cos_sin(params, HEAD_DIM, 128, jnp.zeros((2, 3), jnp.int32), partial_rotary_factor=0.5)
    assert cos.shape == (2, 3, 8)
    # The dict's value is what HF uses; a different explicit argument is a caller bug.
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        rope_init({**params, "partial_rotary_factor": 0.25}, HEAD_DIM, 128, partial_rotary_factor=0.5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_parameters_from_hf_matches_hf_standardisation(case):
    cfg = CASES[case]
    config = LlamaConfig.from_dict({**TINY, **cfg})
    LlamaRotaryEmbedding(config)  # HF re-standardises (e.g. Phi3-style top-level override) here
    expected = {k: v for k, v in config.rope_parameters.items() if k != "type"}
    assert rope_parameters_from_hf(cfg) == expected


def test_rope_parameters_from_hf_legacy_and_v5():
    assert rope_parameters_from_hf({}) == {"rope_type": "default", "rope_theta": 10000.0}
    assert rope_parameters_from_hf({"rope_theta": 5e5}) == {"rope_type": "default", "rope_theta": 5e5}
    legacy = {"rope_theta": 5e5, "max_position_embeddings": 4096,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    assert rope_parameters_from_hf(legacy) == {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 4096}
    v5 = {"max_position_embeddings": 4096, "rope_theta": 1.0,
          "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}}
    # Values inside the dict win over top-level ones.
    assert rope_parameters_from_hf(v5) == {
        "rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6, "original_max_position_embeddings": 4096}
    # Legacy rope_scaling wins over rope_parameters; top-level partial_rotary_factor moves in.
    both = {"rope_scaling": {"type": "linear", "factor": 3.0}, "rope_parameters": {"rope_type": "default"},
            "partial_rotary_factor": 0.5}
    assert rope_parameters_from_hf(both) == {
        "rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    # The input is not mutated.
    assert legacy["rope_scaling"] == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0}


def test_unknown_rope_type_raises():
    params = rope_parameters_from_hf({"rope_scaling": {"type": "mystery", "factor": 2.0}})
    with pytest.raises(ValueError, match="mystery"):
        rope_init(params, HEAD_DIM, 128)
    with pytest.raises(ValueError, match="mystery"):
        rotary_cos_sin(params, HEAD_DIM, 128, jnp.zeros((1, 2), jnp.int32))


def test_missing_required_key_raises():
    with pytest.raises(ValueError, match="factor"):
        rope_init({"rope_type": "linear", "rope_theta": 10000.0}, HEAD_DIM, 128)
