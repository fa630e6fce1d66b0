"""Our Linen models used from Flax NNX through `flax.nnx.bridge` (README "Using the models from Flax NNX"): the NNX
module gives the Linen model's logits, under `nnx.jit` too, and its gradients are the Linen ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.models.nnx_bridge import to_nnx

pytestmark = pytest.mark.usefixtures("quick_compiles")  # conftest: compiles dominate these runs


def test_llava_from_nnx_gives_the_linen_logits_and_gradients(tiny_llava_dir):
    from conftest import llava_inputs

    path, _ = tiny_llava_dir
    model, params, _ = load_pretrained(path)
    ids, mask, pixels = llava_inputs(np.random.default_rng(0), text_lens=(5, 8))
    inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "pixel_values": jnp.asarray(pixels)}
    module = to_nnx(model, params)
    assert isinstance(module, nnx.Module)
    assert isinstance(module.llm["layers_0"]["mlp"]["down_proj"]["kernel"], nnx.Param)
    linen = jax.jit(lambda p, x: model.apply({"params": p}, **x).logits)(params, inputs)
    ours = nnx.jit(lambda m, x: m(**x).logits)(module, inputs)  # the same program: the same numbers
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(linen))

    grads = nnx.jit(nnx.grad(lambda m: m(**inputs).logits[:, -1].sum()))(module)
    reference = jax.jit(jax.grad(lambda p: model.apply({"params": p}, **inputs).logits[:, -1].sum()))(params)
    flat_ref = traverse_util.flatten_dict(reference)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(grads))
    assert flat.keys() == flat_ref.keys()
    for k, g in flat_ref.items():
        np.testing.assert_allclose(np.asarray(flat[k]), np.asarray(g), rtol=1e-5, atol=1e-7, err_msg="/".join(k))


def test_qwen2_vl_from_nnx_gives_the_linen_logits(tmp_path):
    from qwen2_vl_helpers import make_torch_qwen2_vl, qwen_batch, tiny_qwen2_vl_hf_config

    make_torch_qwen2_vl(tiny_qwen2_vl_hf_config()).save_pretrained(tmp_path)
    model, params, _ = load_pretrained(tmp_path)
    ids, mask, pixels, grid = qwen_batch(np.random.default_rng(1), [[3, "i0", 4]], [[1, 4, 4]])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    # the image grid sets shapes: a constant of the program, as the Linen model needs it too
    ours = nnx.jit(lambda m, x: m(**x, image_grid_thw=grid).logits)(to_nnx(model, params), inputs)
    linen = jax.jit(lambda p, x: model.apply({"params": p}, **x, image_grid_thw=grid).logits)(params, inputs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(linen))


def test_params_that_do_not_fit_are_refused(tiny_llava_dir):
    path, _ = tiny_llava_dir
    model, params, _ = load_pretrained(path)
    with pytest.raises(ValueError, match=r"missing \[\('projector', 'linear_1', 'bias'\)\]"):
        to_nnx(model, {**params, "projector": {**params["projector"], "linear_1": {
            "kernel": params["projector"]["linear_1"]["kernel"]}}})
