"""Flax LLaVA-1.5 vs PyTorch transformers, in f32, on tiny random models saved by transformers.

Tolerances loosen with depth: vision features 1e-5, projector 2e-5, logits 1e-4 of their scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import llava_inputs, make_torch_llava, positions_like_ours, tiny_llava_hf_config

from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.models.llava import LlavaForConditionalGeneration

CONFIGS = {
    "gqa-untied-layer-2": dict(),
    "mha-tied-layer-1-full": dict(
        num_key_value_heads=4, tie_word_embeddings=True, vision_feature_layer=-1, vision_feature_select_strategy="full"
    ),
    "multilayer-biases-llama3rope": dict(
        vision_layers=3,
        vision_feature_layer=[-3, -1],
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # Positive index. (transformers cannot do layer 0: it passes output_hidden_states=0, i.e. False.)
    "layer1-noprojbias-linearrope": dict(
        vision_feature_layer=1,
        projector_bias=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
}


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch_model = make_torch_llava(tiny_llava_hf_config(**CONFIGS[request.param]))
    path = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(path)
    model, params, config = load_pretrained(path)
    return torch_model, model, params, config


def test_vision_features_and_projector(pair):
    torch_model, model, params, config = pair
    pixels = np.random.default_rng(1).standard_normal((3, 3, 28, 28)).astype(np.float32)
    selected, projected = model.apply(
        {"params": params}, jnp.asarray(pixels), method=LlavaForConditionalGeneration.get_image_features
    )
    with torch.no_grad():
        hidden = torch_model.model.vision_tower(torch.tensor(pixels), output_hidden_states=True).hidden_states
        layers = config.feature_layers
        chosen = [hidden[i] for i in layers]
        if config.vision_feature_select_strategy == "default":
            chosen = [h[:, 1:] for h in chosen]
        ref_selected = torch.cat(chosen, dim=-1).numpy()
        ref_projected = torch.stack(torch_model.model.get_image_features(torch.tensor(pixels)).pooler_output).numpy()
    assert selected.shape == ref_selected.shape
    assert max_rel(selected, ref_selected) < 1e-5
    assert max_rel(projected, ref_projected) < 2e-5


def test_logits_with_images(pair):
    torch_model, model, params, config = pair
    n = config.num_image_tokens
    ids, mask, pixels = llava_inputs(np.random.default_rng(2), text_lens=(7, 7), image_tokens=n)
    out = model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels)
        ).logits.numpy()
    assert out.logits.shape == ref.shape
    assert max_rel(out.logits, ref) < 1e-4


def test_logits_left_padding_mixed_text_and_image_rows(pair):
    torch_model, model, params, config = pair
    n = config.num_image_tokens
    ids, mask, pixels = llava_inputs(
        np.random.default_rng(3), text_lens=(4, 9, 6), with_image=(True, False, True), image_tokens=n
    )
    assert (mask == 0).any(), "the batch must contain padding"
    out = model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions_like_ours(mask)),
            pixel_values=torch.tensor(pixels),
        ).logits.numpy()
    valid = mask.astype(bool)
    assert max_rel(np.asarray(out.logits)[valid], ref[valid]) < 1e-4


@pytest.mark.parametrize("keep", [1, 5])
def test_logits_to_keep_matches_transformers(pair, keep):
    """`logits_to_keep` N: the last N positions' logits, as transformers' own argument of that name gives them."""
    torch_model, model, params, config = pair
    ids, mask, pixels = llava_inputs(np.random.default_rng(8), text_lens=(5, 5), image_tokens=config.num_image_tokens)
    out = model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=pixels,
                      logits_to_keep=keep)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels), logits_to_keep=keep).logits.numpy()
    assert out.logits.shape == ref.shape == (2, keep, config.text.vocab_size)
    assert max_rel(out.logits, ref) < 1e-4
    with pytest.raises(ValueError, match="logits_to_keep"):
        model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=-1)


def test_text_only(pair):
    torch_model, model, params, _ = pair
    ids = np.random.default_rng(4).integers(3, 98, (2, 11))
    out = model.apply({"params": params}, input_ids=ids)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert max_rel(out.logits, ref) < 1e-4


def test_xla_attention_backend_matches_reference(pair):
    _, model, params, config = pair
    ids, mask, pixels = llava_inputs(
        np.random.default_rng(5), text_lens=(3, 8), image_tokens=config.num_image_tokens
    )
    ref = model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    xla_model = LlavaForConditionalGeneration(config.replace(attention_impl="xla"))
    out = xla_model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    valid = mask.astype(bool)
    assert max_rel(np.asarray(out)[valid], np.asarray(ref)[valid]) < 1e-5


def test_bfloat16_compute_tracks_float32(tiny_llava_dir):
    path, _ = tiny_llava_dir
    model32, params, config = load_pretrained(path)
    model16, params16, _ = load_pretrained(path, dtype="bfloat16")
    assert jax.tree_util.tree_leaves(params16)[0].dtype == jnp.float32  # f32 master weights
    ids, mask, pixels = llava_inputs(np.random.default_rng(6), image_tokens=config.num_image_tokens)
    ref = model32.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    out = model16.apply({"params": params16}, input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert out.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa; through 2+2 layers a few percent of the logit scale is expected.
    assert max_rel(out, ref) < 5e-2
    assert np.isfinite(np.asarray(out, np.float32)).all()


def test_image_token_count_mismatch_is_a_clear_error(tiny_llava_dir):
    path, _ = tiny_llava_dir
    model, params, config = load_pretrained(path)
    ids, mask, pixels = llava_inputs(np.random.default_rng(7), image_tokens=config.num_image_tokens - 1)
    with pytest.raises(ValueError, match="image tokens"):
        model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    ids, mask, _ = llava_inputs(np.random.default_rng(7), image_tokens=config.num_image_tokens)
    with pytest.raises(ValueError, match="no pixel_values"):
        model.apply({"params": params}, input_ids=ids, attention_mask=mask)

