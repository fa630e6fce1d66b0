"""Flax Qwen2-VL vs PyTorch transformers, in f32, on tiny random models saved by transformers.

Tolerances loosen with depth: vision tower 1e-5, merged features 2e-5, logits 1e-4 of their scale;
M-RoPE position ids are integers and must match exactly.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import positions_like_ours, torch_generate_new_tokens, trim_at_eos
from flax import traverse_util
from qwen2_vl_helpers import (
    IMAGE,
    MERGE,
    make_torch_qwen2_vl,
    max_rel,
    qwen_batch,
    tiny_qwen2_vl_hf_config,
    torch_image_kwargs,
)
from safetensors.numpy import load_file, save_file
from transformers import Qwen2VLForConditionalGeneration as TorchQwen2VL

from vleraser_jax.generate import _generate, generate
from vleraser_jax.checkpoints import QWEN2VL_TABLE, CheckpointError, load_pretrained, save_pretrained
from vleraser_jax.models.configs import ConfigError, Qwen2VLConfig
from vleraser_jax.models.qwen2_vl import Qwen2VLForConditionalGeneration

CONFIGS = {
    "gqa-untied": dict(),
    "mha-tied-linearrope-gelu": dict(
        num_key_value_heads=4,
        tie_word_embeddings=True,
        vision_act="gelu",
        vision_layers=1,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0, "mrope_section": [1, 2, 3]},
    ),
}
# Two non-square images of different sizes (patch grids 4x6 and 6x2 -> 6 and 3 merged tokens).
GRIDS = [[1, 4, 6], [1, 6, 2]]


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, inputs):
    """One compiled forward per model and input shapes (eager op-by-op dispatch is far slower here)."""
    return model.apply({"params": params}, **inputs)


def flat(params):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def torch_logits(model, ids, mask, pixels=None, grid=None, **kw):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **torch_image_kwargs(ids, pixels, grid), **kw
        ).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch_model = make_torch_qwen2_vl(tiny_qwen2_vl_hf_config(**CONFIGS[request.param]))
    path = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(path)
    model, params, config = load_pretrained(path)
    return torch_model, model, params, config, path


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    torch_model = make_torch_qwen2_vl(tiny_qwen2_vl_hf_config())
    path = tmp_path_factory.mktemp("qwen2_vl_default")
    torch_model.save_pretrained(path)
    model, params, config = load_pretrained(path)
    return torch_model, model, params, config, path


# ----------------------------------------------------------------------------- parity


def test_vision_tower_and_merged_features(pair):
    torch_model, model, params, _, _ = pair
    grid = np.array(GRIDS + [[1, 2, 2]])
    pixels = np.random.default_rng(1).standard_normal((int(grid.prod(-1).sum()), 96)).astype(np.float32)
    hidden, merged = jax.jit(
        lambda p, px, g: model.apply({"params": p}, px, g, method=Qwen2VLForConditionalGeneration.get_image_features)
    )(params, pixels, grid)
    with torch.no_grad():
        ref = torch_model.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid))
    assert merged.shape == (int(grid.prod(-1).sum()) // MERGE**2, 48)
    assert max_rel(hidden, ref.last_hidden_state.numpy()) < 1e-5
    assert max_rel(merged, ref.pooler_output.numpy()) < 2e-5


def test_images_never_attend_to_each_other(default):
    _, model, params, _, _ = default
    rng = np.random.default_rng(2)
    a = rng.standard_normal((24, 96)).astype(np.float32)
    b = rng.standard_normal((12, 96)).astype(np.float32)
    get = jax.jit(
        lambda px, g: model.apply({"params": params}, px, g, method=Qwen2VLForConditionalGeneration.get_image_features)
    )
    alone_a, alone_b = get(a, np.array(GRIDS[:1]))[0], get(b, np.array(GRIDS[1:]))[0]
    together = get(np.concatenate([a, b]), np.array(GRIDS))[0]
    np.testing.assert_allclose(together[:24], alone_a, atol=1e-6, rtol=0)
    np.testing.assert_allclose(together[24:], alone_b, atol=1e-6, rtol=0)


def test_rope_index_matches_transformers(default):
    torch_model, model, params, _, _ = default
    ids, mask, _, grid = qwen_batch(
        np.random.default_rng(3), [[3, "i0", 2, "i1", 4], [5], [2, "i2", 1]], GRIDS + [[1, 2, 4]]
    )
    ours, deltas = model.apply(
        {"params": params}, ids, mask, grid, method=Qwen2VLForConditionalGeneration.get_rope_index
    )
    ref, ref_deltas = torch_model.model.get_rope_index(
        torch.tensor(ids),
        torch.tensor((ids == IMAGE).astype(np.int64)),
        torch.tensor(grid),
        attention_mask=torch.tensor(mask),
    )
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    np.testing.assert_array_equal(np.asarray(deltas), ref_deltas.numpy()[:, 0])
    assert (np.asarray(ours)[:, 0, 3:8] != np.asarray(ours)[0, 0, 3:8]).any()  # image rows really are 3-D


def test_logits_one_image(default):
    torch_model, model, params, _, _ = default
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(4), [[4, "i0", 5]], GRIDS[:1])
    out = forward(model, params, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid))
    ref = torch_logits(torch_model, ids, mask, pixels, grid)
    assert out.logits.shape == ref.shape
    assert max_rel(out.logits, ref) < 1e-4


def test_logits_to_keep_matches_transformers(default):
    torch_model, model, params, _, _ = default
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(4), [[4, "i0", 5]], GRIDS[:1])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
    out = model.apply({"params": params}, **inputs, logits_to_keep=3)
    ref = torch_logits(torch_model, ids, mask, pixels, grid, logits_to_keep=3)
    assert out.logits.shape == ref.shape and ref.shape[1] == 3
    assert max_rel(out.logits, ref) < 1e-4


def test_logits_two_images_of_different_sizes_in_one_sample(default):
    torch_model, model, params, _, _ = default
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(5), [[3, "i0", 2, "i1", 4]], GRIDS)
    out = forward(model, params, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid))
    assert max_rel(out.logits, torch_logits(torch_model, ids, mask, pixels, grid)) < 1e-4


def test_logits_left_padding_mixed_text_and_image_rows(pair):
    torch_model, model, params, _, _ = pair
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(6), [[2, "i0", 3], [14], [1, "i1", 2]], GRIDS)
    assert (mask == 0).any(), "the batch must contain padding"
    out = forward(model, params, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid))
    valid = mask.astype(bool)
    # transformers derives the 3-D positions itself (get_rope_index, mask-aware): nothing is passed.
    assert max_rel(np.asarray(out.logits)[valid], torch_logits(torch_model, ids, mask, pixels, grid)[valid]) < 1e-4


def test_text_only_batch(pair):
    torch_model, model, params, _, _ = pair
    ids, mask, _, _ = qwen_batch(np.random.default_rng(7), [[6], [11]], [])
    out = forward(model, params, dict(input_ids=ids, attention_mask=mask))
    # Without images transformers counts positions from 0 over padding too; ours skip it, as in generate.
    ref = torch_logits(torch_model, ids, mask, position_ids=torch.tensor(positions_like_ours(mask)))
    valid = mask.astype(bool)
    assert max_rel(np.asarray(out.logits)[valid], ref[valid]) < 1e-4
    np.testing.assert_array_equal(out.rope_deltas, [0, 0])


def test_jit_one_program_for_same_shapes_and_traced_grid(default):
    torch_model, model, params, _, _ = default
    rng = np.random.default_rng(8)
    fwd = jax.jit(lambda p, **kw: model.apply({"params": p}, **kw).logits)
    # Same patch and token totals, different image sizes: one compiled program, grid values traced.
    for grids in (GRIDS, [[1, 6, 4], [1, 2, 6]]):
        ids, mask, pixels, grid = qwen_batch(rng, [[3, "i0", 2, "i1", 4]], grids)
        logits = fwd(params, input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
        assert max_rel(logits, torch_logits(torch_model, ids, mask, pixels, grid)) < 1e-4
    assert fwd._cache_size() == 1


def test_xla_attention_backend_matches_reference(default):
    _, model, params, config, _ = default
    # The batch of test_logits_left_padding_mixed_text_and_image_rows (its reference forward is compiled).
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(6), [[2, "i0", 3], [14], [1, "i1", 2]], GRIDS)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
    xla_model = Qwen2VLForConditionalGeneration(config.replace(attention_impl="xla"))
    valid = mask.astype(bool)
    ref, out = forward(model, params, inputs).logits, forward(xla_model, params, inputs).logits
    assert max_rel(np.asarray(out)[valid], np.asarray(ref)[valid]) < 1e-5


def test_bfloat16_compute_tracks_float32(default):
    _, model, params, _, path = default
    model16, params16, _ = load_pretrained(path, dtype="bfloat16")
    assert jax.tree_util.tree_leaves(params16)[0].dtype == jnp.float32  # f32 master weights
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(4), [[4, "i0", 5]], GRIDS[:1])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
    out = forward(model16, params16, inputs).logits
    assert out.dtype == jnp.bfloat16
    assert max_rel(out, forward(model, params, inputs).logits) < 5e-2


def test_ffn_hooks_capture_image_token_keys_and_lora_applies(default):
    _, model, params, config, _ = default
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(10), [[2, "i0", 3]], GRIDS[:1])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
    out, state = jax.jit(lambda p: model.apply({"params": p}, **inputs, mutable=["intermediates"]))(params)
    keys = state["intermediates"]["llm"]["layers_1"]["mlp"]["ffn_key"][0]
    assert keys.shape == (*ids.shape, config.text.intermediate_size)
    f, d = config.text.intermediate_size, config.text.hidden_size
    lora = {"llm": {"layers_0": {"mlp": {"down_proj": {
        "a": jnp.ones((f, 2)) * 0.1, "b": jnp.ones((2, d)) * 0.1, "scale": jnp.asarray(1.0)}}}}}
    with_lora = jax.jit(lambda v: model.apply(v, **inputs).logits)({"params": params, "lora": lora})
    assert not np.allclose(with_lora, out.logits)


def test_input_errors(default):
    _, model, params, _, _ = default
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(11), [[2, "i0", 3]], GRIDS[:1])
    apply = lambda **kw: model.apply({"params": params}, **kw)
    with pytest.raises(ValueError, match="image tokens"):
        short = np.delete(ids, int(np.flatnonzero(ids[0] == IMAGE)[0]), axis=1)
        apply(input_ids=short, pixel_values=pixels, image_grid_thw=grid)
    with pytest.raises(ValueError, match="no pixel_values"):
        apply(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="image_grid_thw"):
        apply(input_ids=ids, pixel_values=pixels)
    with pytest.raises(ValueError, match="implies 36 patches"):
        model.apply(
            {"params": params}, pixels[:20], np.array([[1, 6, 6]]), method=Qwen2VLForConditionalGeneration.get_image_features
        )


# ----------------------------------------------------------------------------- checkpoints and configs


@pytest.mark.parametrize("naming", ["transformers", "legacy"])
def test_export_round_trip_through_torch(pair, tmp_path, naming):
    torch_model, _, params, config, _ = pair
    out = save_pretrained(params, config, tmp_path / "export", naming=naming)
    reloaded, info = TorchQwen2VL.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(12), [[2, "i0", 3, "i1", 1], [9]], GRIDS)
    np.testing.assert_allclose(
        torch_logits(reloaded.eval(), ids, mask, pixels, grid),
        torch_logits(torch_model, ids, mask, pixels, grid),
        atol=1e-5,
        rtol=0,
    )
    names = load_file(str(out / "model.safetensors")).keys()
    prefix = {"transformers": "model.language_model.layers.0.", "legacy": "model.layers.0."}[naming]
    assert any(n.startswith(prefix) for n in names)
    assert any(n.startswith("model.visual." if naming == "transformers" else "visual.") for n in names)
    assert ("lm_head.weight" in names) != config.text.tie_word_embeddings


def test_both_on_disk_namings_load_identically(default, tmp_path):
    _, _, params, _, path = default
    tensors = load_file(str(path / "model.safetensors"))
    # transformers 5 itself writes the released Qwen2-VL names (model.layers..., visual...).
    assert "model.layers.0.mlp.up_proj.weight" in tensors and "visual.merger.mlp.0.weight" in tensors
    v5 = tmp_path / "v5"
    v5.mkdir()
    (v5 / "config.json").write_bytes((path / "config.json").read_bytes())
    renamed = {QWEN2VL_TABLE.canonical(n): t for n, t in tensors.items()}
    assert "model.language_model.layers.0.mlp.up_proj.weight" in renamed
    assert "model.visual.patch_embed.proj.weight" in renamed
    save_file(renamed, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    _, v5_params, _ = load_pretrained(v5)
    a, b = flat(params), flat(v5_params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_released_flat_config_layout(default):
    _, _, _, config, path = default
    nested = json.loads((path / "config.json").read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    vision = dict(nested.pop("vision_config"), model_type="qwen2_vl")
    vision["in_chans"] = vision.pop("in_channels")
    # As Qwen2-VL-7B-Instruct ships it: text fields at the top, legacy rope_scaling spelling.
    flat_cfg = {
        **nested, **{k: v for k, v in text.items() if k != "model_type"},
        "vision_config": vision, "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
    }
    assert Qwen2VLConfig.from_hf_config(flat_cfg) == config
    assert Qwen2VLConfig.from_hf_config(config.to_hf_config()) == config
    assert config.mrope_section == (2, 1, 3) and config.text.head_dim == 12 and config.text.qkv_bias


def test_config_errors():
    base = tiny_qwen2_vl_hf_config().to_dict()
    bad_section = json.loads(json.dumps(base))
    bad_section["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 3]
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen2VLConfig.from_hf_config(bad_section)
    sliding = json.loads(json.dumps(base))
    sliding["text_config"]["use_sliding_window"] = True
    with pytest.raises(ConfigError, match="sliding"):
        Qwen2VLConfig.from_hf_config(sliding)
    width = json.loads(json.dumps(base))
    width["vision_config"]["hidden_size"] = 40
    with pytest.raises(ConfigError, match="merger output"):
        Qwen2VLConfig.from_hf_config(width)


def test_misshaped_patch_embedding_is_named(default, tmp_path):
    _, _, _, _, path = default
    tensors = load_file(str(path / "model.safetensors"))
    name = "visual.patch_embed.proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].reshape(32, 3, 8, 2, 2))  # same size, wrong kernel
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((path / "config.json").read_bytes())
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight.*\(32, 3, 8, 2, 2\).*\(32, 3, 2, 4, 4\)"):
        load_pretrained(broken)


# ----------------------------------------------------------------------------- generation


def torch_greedy(torch_model, ids, mask, pixels, grid, max_new_tokens, eos):
    return torch_generate_new_tokens(torch_model, ids, mask, max_new_tokens, eos, **torch_image_kwargs(ids, pixels, grid))


def test_greedy_matches_torch_generate_with_images_and_left_padding(default):
    """Rows: two images of different sizes, text only, one image; left-padded. Decoding continues each
    row's M-RoPE positions (text-only rows included) exactly as transformers' generate."""
    torch_model, model, params, _, _ = default
    rows = [[2, "i0", 3, "i1", 2], [6], [1, "i2", 2]]
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(13), rows, GRIDS + [[1, 2, 4]])
    assert (mask == 0).any()
    ours = generate(
        model, params, ids, mask, pixels, image_grid_thw=grid, max_new_tokens=10, eos_token_id=2, pad_token_id=0
    )
    ref = torch_greedy(torch_model, ids, mask, pixels, grid, 10, eos=2)
    assert [trim_at_eos(r, 2) for r in ref] == ours.trimmed()


def test_cached_decoding_equals_full_forward_and_compiles_once(default):
    """Greedy tokens are the argmax of one uncached forward over prompt + generated tokens, so the cached
    M-RoPE positions (prefill rope_deltas + mask) equal the ones get_rope_index gives the whole sequence."""
    _, model, params, _, _ = default
    rng = np.random.default_rng(14)
    ids, mask, pixels, grid = qwen_batch(rng, [[2, "i0", 3], [1, "i1", 1]], GRIDS)
    out = generate(model, params, ids, mask, pixels, image_grid_thw=grid, max_new_tokens=6, eos_token_id=[])
    new = np.asarray(out.tokens)
    assert not (new == IMAGE).any()  # a generated image token would be an image slot in the full forward
    full_ids = np.concatenate([ids, new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    logits = forward(
        model, params, dict(input_ids=full_ids, attention_mask=full_mask, pixel_values=pixels, image_grid_thw=grid)
    ).logits
    t = ids.shape[1]
    np.testing.assert_array_equal(np.argmax(np.asarray(logits)[:, t - 1:-1], -1), new)
    before = _generate._cache_size()
    ids2, mask2, pixels2, grid2 = qwen_batch(rng, [[2, "i0", 3], [1, "i1", 1]], [[1, 6, 4], [1, 2, 6]])
    assert ids2.shape == ids.shape and pixels2.shape == pixels.shape
    generate(model, params, ids2, mask2, pixels2, image_grid_thw=grid2, max_new_tokens=6, eos_token_id=[])
    assert _generate._cache_size() == before


def test_decode_step_without_rope_deltas_is_refused(default):
    from vleraser_jax.models.llama import init_cache

    _, model, params, config, _ = default
    cache = init_cache(config.text, 1, 8)
    with pytest.raises(ValueError, match="rope_deltas"):
        model.apply({"params": params}, input_ids=np.array([[5]]), cache=cache, cache_index=3)
