"""KV-cache generation: token-exact against transformers' greedy generate; compiled once; sampling."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from conftest import llava_inputs, positions_like_ours, torch_generate_new_tokens, trim_at_eos

from vleraser_jax.generate import _generate, generate
from vleraser_jax.checkpoints import load_pretrained


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir):
    path, torch_model = tiny_llava_dir
    model, params, config = load_pretrained(path)
    return torch_model, model, params, config


def torch_greedy(torch_model, ids, mask, pixels, max_new_tokens, eos):
    images = {} if pixels is None else {"pixel_values": torch.tensor(pixels)}
    return torch_generate_new_tokens(torch_model, ids, mask, max_new_tokens, eos, **images)


@pytest.mark.parametrize("with_image", [(True, True), (False, False), (True, False)])
def test_greedy_matches_torch_generate(loaded, with_image):
    torch_model, model, params, config = loaded
    ids, mask, pixels = llava_inputs(
        np.random.default_rng(10), text_lens=(5, 9), with_image=with_image, image_tokens=config.num_image_tokens
    )
    pixels = pixels if any(with_image) else None
    ours = generate(model, params, ids, mask, pixels, max_new_tokens=16, eos_token_id=2, pad_token_id=0)
    ref = torch_greedy(torch_model, ids, mask, pixels, 16, eos=2)
    assert [trim_at_eos(r, 2) for r in ref] == ours.trimmed()


def test_eos_stops_rows_and_pads_after(loaded):
    torch_model, model, params, config = loaded
    ids, mask, pixels = llava_inputs(np.random.default_rng(11), text_lens=(4, 7), image_tokens=config.num_image_tokens)
    free = generate(model, params, ids, mask, pixels, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    eos = int(np.asarray(free.tokens)[0, 3])  # a token row 0 emits at step 3 becomes "eos"
    ours = generate(model, params, ids, mask, pixels, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    ref = torch_greedy(torch_model, ids, mask, pixels, 12, eos=eos)
    assert [trim_at_eos(r, eos) for r in ref] == ours.trimmed()
    row0 = np.asarray(ours.tokens)[0]
    first_eos = list(row0).index(eos)
    assert first_eos <= 3 and (row0[first_eos + 1:] == 0).all()


def test_prefill_plus_cached_steps_equal_full_forward(loaded):
    """Logits of every cached decode step equal a full (uncached) forward over the same tokens."""
    _, model, params, config = loaded
    ids, mask, pixels = llava_inputs(np.random.default_rng(12), text_lens=(3, 8), image_tokens=config.num_image_tokens)
    out = generate(model, params, ids, mask, pixels, max_new_tokens=6, eos_token_id=[])
    full_ids = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(np.asarray(out.tokens))], axis=1)
    logits = model.apply({"params": params}, input_ids=full_ids, attention_mask=full_mask, pixel_values=pixels).logits
    t = ids.shape[1]
    # greedy tokens are the argmax of the full forward at the preceding position
    np.testing.assert_array_equal(np.argmax(np.asarray(logits)[:, t - 1:-1], -1), np.asarray(out.tokens))
    np.testing.assert_array_equal(positions_like_ours(full_mask)[:, -1], mask.sum(1) + 5)


def test_compiles_once_per_shape(loaded):
    _, model, params, config = loaded
    rng = np.random.default_rng(13)
    ids, mask, pixels = llava_inputs(rng, image_tokens=config.num_image_tokens)
    generate(model, params, ids, mask, pixels, max_new_tokens=5, eos_token_id=2)
    before = _generate._cache_size()
    for _ in range(2):
        ids2, mask2, pixels2 = llava_inputs(rng, image_tokens=config.num_image_tokens)
        generate(model, params, ids2, mask2, pixels2, max_new_tokens=5, eos_token_id=2)
    assert _generate._cache_size() == before


def test_sampling_is_reproducible_and_top_p_edge_cases(loaded):
    _, model, params, config = loaded
    ids, mask, pixels = llava_inputs(np.random.default_rng(14), image_tokens=config.num_image_tokens)
    kw = dict(max_new_tokens=10, eos_token_id=[], temperature=1.5)
    a = generate(model, params, ids, mask, pixels, rng=jax.random.PRNGKey(1), **kw)
    b = generate(model, params, ids, mask, pixels, rng=jax.random.PRNGKey(1), **kw)
    c = generate(model, params, ids, mask, pixels, rng=jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = generate(model, params, ids, mask, pixels, max_new_tokens=10, eos_token_id=[])
    nucleus_of_one = generate(model, params, ids, mask, pixels, rng=jax.random.PRNGKey(3), top_p=1e-6, **kw)
    np.testing.assert_array_equal(greedy.tokens, nucleus_of_one.tokens)


def test_bad_generation_arguments(loaded):
    _, model, params, config = loaded
    ids, mask, pixels = llava_inputs(np.random.default_rng(15), text_lens=(3, 6), image_tokens=config.num_image_tokens)
    right_padded = mask[:, ::-1].copy()
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, params, ids, right_padded, pixels)
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model, params, ids, mask, pixels, temperature=0.7)
