"""The FFN hooks the unlearning methods build on: key/output capture and the functional down_proj LoRA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import llava_inputs, positions_like_ours

from vleraser_jax.checkpoints import load_pretrained


@pytest.fixture(scope="module")
def setup(tiny_llava_dir):
    path, _ = tiny_llava_dir
    model, params, config = load_pretrained(path)
    ids, mask, pixels = llava_inputs(np.random.default_rng(20), text_lens=(4, 7), image_tokens=config.num_image_tokens)
    return model, params, config, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def random_lora(config, rank=3, seed=0, zero_b=False):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * config.text.num_hidden_layers)
    f, d = config.text.intermediate_size, config.text.hidden_size
    tree = {}
    for i in range(config.text.num_hidden_layers):
        b = jnp.zeros((rank, d)) if zero_b else 0.3 * jax.random.normal(keys[2 * i + 1], (rank, d))
        tree[f"layers_{i}"] = {"mlp": {"down_proj": {"a": 0.3 * jax.random.normal(keys[2 * i], (f, rank)), "b": b, "scale": jnp.asarray(2.0)}}}
    return {"llm": tree}


def random_basis(config, k=5, seed=1):
    f = config.text.intermediate_size
    tree = {}
    for i in range(config.text.num_hidden_layers):
        q, _ = np.linalg.qr(np.random.default_rng(seed + i).standard_normal((f, k)))
        tree[f"layers_{i}"] = {"mlp": {"down_proj": {"basis": jnp.asarray(q, jnp.float32)}}}
    return {"llm": tree}


def with_down_kernels(params, fn):
    new = jax.tree_util.tree_map(lambda x: x, params)
    for name, layer in new["llm"].items():
        if name.startswith("layers_"):
            layer["mlp"]["down_proj"]["kernel"] = fn(name, layer["mlp"]["down_proj"]["kernel"])
    return new


def delta_kernel(lora, vacuum, name):
    entry = lora["llm"][name]["mlp"]["down_proj"]
    basis = vacuum["llm"][name]["mlp"]["down_proj"]["basis"]
    p = jnp.eye(basis.shape[0]) - basis @ basis.T
    return entry["scale"] * p @ entry["a"] @ entry["b"]


def test_captured_keys_equal_the_torch_down_proj_inputs(setup, tiny_llava_dir):
    """ffn_key is what transformers' down_proj receives (a forward pre-hook on the reference model)."""
    import torch

    model, params, config, inputs = setup
    _, torch_model = tiny_llava_dir
    _, state = model.apply({"params": params}, **inputs, mutable=["intermediates"])
    inter = state["intermediates"]["llm"]
    captured = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].numpy()))
             for i, layer in enumerate(torch_model.model.language_model.layers)]
    with torch.no_grad():
        torch_model(input_ids=torch.tensor(inputs["input_ids"]), attention_mask=torch.tensor(inputs["attention_mask"]),
                    pixel_values=torch.tensor(inputs["pixel_values"]),
                    position_ids=torch.tensor(positions_like_ours(inputs["attention_mask"])))
    for h in hooks:
        h.remove()
    b, t = inputs["input_ids"].shape
    for i in range(config.text.num_hidden_layers):
        (key,) = inter[f"layers_{i}"]["mlp"]["ffn_key"]
        assert key.shape == (b, t, config.text.intermediate_size)
        real = inputs["attention_mask"].astype(bool)  # padded positions may differ: their attention rows are empty
        np.testing.assert_allclose(np.asarray(key)[real], captured[i][real], atol=2e-5, rtol=1e-4)


def test_zero_lora_is_identity(setup):
    model, params, config, inputs = setup
    ref = model.apply({"params": params}, **inputs).logits
    out = model.apply({"params": params, "lora": random_lora(config, zero_b=True)}, **inputs).logits
    np.testing.assert_array_equal(out, ref)


def test_added_lora_equals_merged_weights_with_vacuum_projector(setup):
    model, params, config, inputs = setup
    lora, vacuum = random_lora(config), random_basis(config)
    out = model.apply({"params": params, "lora": lora, "vacuum": vacuum}, **inputs).logits
    merged = with_down_kernels(params, lambda name, w: w + delta_kernel(lora, vacuum, name))
    ref = model.apply({"params": merged}, **inputs).logits
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max())
    assert np.abs(np.asarray(out) - np.asarray(model.apply({"params": params}, **inputs).logits)).max() > 1e-3


def test_dense_projector_equals_compact_basis(setup):
    model, params, config, inputs = setup
    lora, vacuum = random_lora(config), random_basis(config)
    dense = {
        "llm": {
            name: {"mlp": {"down_proj": {"dense": jnp.eye(u.shape[0]) - u @ u.T}}}
            for name, entry in vacuum["llm"].items()
            for u in [entry["mlp"]["down_proj"]["basis"]]
        }
    }
    a = model.apply({"params": params, "lora": lora, "vacuum": vacuum}, **inputs).logits
    b = model.apply({"params": params, "lora": lora, "vacuum": dense}, **inputs).logits
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(np.asarray(a)).max())


def test_replaced_mode_uses_only_the_lora_path(setup):
    model, params, config, inputs = setup
    lora, vacuum = random_lora(config), random_basis(config)
    out = model.apply({"params": params, "lora": lora, "vacuum": vacuum}, **inputs, lora_mode="replaced").logits
    swapped = with_down_kernels(params, lambda name, w: delta_kernel(lora, vacuum, name))
    ref = model.apply({"params": swapped}, **inputs).logits
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(np.asarray(ref)).max())
    with pytest.raises(ValueError, match="lora_mode"):
        model.apply({"params": params, "lora": lora}, **inputs, lora_mode="sideways")


def test_lora_backward_equals_autodiff_of_the_plain_formula():
    """The LoRA product's written-out VJP (models.layers._low_rank) against jax.grad of the same einsums."""
    from vleraser_jax.models import layers

    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    x = jax.random.normal(keys[0], (2, 5, 12))
    a, b = jax.random.normal(keys[1], (12, 3)), jax.random.normal(keys[2], (3, 7))
    cotangent = jax.random.normal(keys[3], (2, 5, 7))
    scale = jnp.asarray(0.7)

    def plain(x, a, b, scale):
        return jnp.einsum("...r,rd->...d", jnp.einsum("...f,fr->...r", x, a), b) * scale

    want = jax.vjp(plain, x, a, b, scale)[1](cotangent)
    got = jax.vjp(layers._low_rank, x, a, b, scale)[1](cotangent)
    np.testing.assert_allclose(layers._low_rank(x, a, b, scale), plain(x, a, b, scale), rtol=1e-6)
    for name, w, g in zip(("x", "a", "b", "scale"), want, got):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-5, err_msg=name)
    # through lora_delta with a vacuum projector too, and under jit
    projector = {"basis": jnp.linalg.qr(jax.random.normal(keys[0], (12, 4)))[0]}
    lora = {"a": a, "b": b, "scale": scale}
    f = jax.jit(jax.grad(lambda l: jnp.sum(layers.lora_delta(x, l, projector) * cotangent)))
    x_p = layers.vacuum_project(x, projector)
    np.testing.assert_allclose(f(lora)["a"], jax.grad(lambda a: jnp.sum(plain(x_p, a, b, scale) * cotangent))(a),
                               rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 5, 12)])
def test_dense_rows_product_and_its_gradients_equal_the_batched_formula(shape):
    """Dense multiplies x flattened to rows (models.layers._linear_rows, for a faster weight gradient): the same
    output and the same gradients as autodiff of the batched einsum, for any leading shape."""
    from vleraser_jax.models import layers

    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    x, kernel = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], (12, 7))
    cotangent = jax.random.normal(keys[2], (*shape[:-1], 7))

    def batched(x, kernel):
        return jnp.einsum("...i,io->...o", x, kernel)

    np.testing.assert_allclose(layers._linear_rows(x, kernel), batched(x, kernel), rtol=1e-6, atol=1e-6)
    want = jax.vjp(batched, x, kernel)[1](cotangent)
    got = jax.jit(lambda x, k, g: jax.vjp(layers._linear_rows, x, k)[1](g))(x, kernel, cotangent)
    for name, w, g in zip(("x", "kernel"), want, got):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-5, err_msg=name)
    # no custom rule: forward mode (jvp, what a Hessian-vector product needs) still works through the layer
    tangent = jax.jvp(lambda k: layers._linear_rows(x, k), (kernel,), (jnp.ones_like(kernel),))[1]
    np.testing.assert_allclose(tangent, batched(x, jnp.ones_like(kernel)), rtol=1e-5, atol=1e-5)
