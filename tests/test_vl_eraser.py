"""VL-Eraser's pieces: LoRA tree, vacuum projector, distillation loss, deletion, the stage-1 step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import llava_inputs
from flax import traverse_util

from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.models.layers import lora_delta, vacuum_project
from vleraser_jax.unlearn import lora as lora_lib
from vleraser_jax.unlearn import trainer as tr
from vleraser_jax.unlearn import vacuum
from vleraser_jax.unlearn import vl_eraser as vle


@pytest.fixture(scope="module")
def setup(tiny_llava_dir):
    path, _ = tiny_llava_dir
    model, params, config = load_pretrained(path)
    rng = np.random.default_rng(0)
    retain = []
    for _ in range(3):  # 3 batches x 3 images = 9 retain images
        ids, mask, pixels = llava_inputs(rng, text_lens=(4, 6, 5), with_image=(True, True, True),
                                         image_tokens=config.num_image_tokens)
        retain.append({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})
    moments, n = vacuum.collect_moments(model, params, retain, progress=False)
    return model, params, config, retain, moments, n


def pooled_keys(model, params, batches):
    """Per-image mean FFN keys per block, computed independently of vacuum.py (numpy)."""
    out = {}
    for batch in batches:
        _, state = model.apply({"params": params}, **batch, mutable=["intermediates"])
        flat = traverse_util.flatten_dict(state["intermediates"])
        is_image = batch["input_ids"] == model.config.image_token_index
        for path, value in flat.items():
            if path[-1] == "ffn_key":
                h = np.asarray(value[0])
                block = "/".join(path[:-1])
                out.setdefault(block, []).extend(h[b][is_image[b]].mean(0) for b in range(h.shape[0]))
    return {k: np.stack(v) for k, v in out.items()}


def test_moments_equal_an_independent_computation(setup):
    model, params, _, retain, moments, n = setup
    keys = pooled_keys(model, params, retain)
    assert n == 9
    for block, h in keys.items():
        np.testing.assert_allclose(moments[block], h.T @ h / len(h), rtol=1e-4, atol=1e-6)
    tokens, _ = vacuum.collect_moments(model, params, retain, pooling="tokens", progress=False)
    assert set(tokens) == set(moments)


def test_projector_is_symmetric_idempotent_and_annihilates_retain_keys(setup):
    model, params, _, retain, moments, _ = setup
    keys = pooled_keys(model, params, retain)
    projectors, report = vacuum.build_vacuum_projectors(moments, threshold=1e-6, mode="relative")
    entries = lora_lib.entries(projectors)
    assert [r.block for r in report] == ["llm/layers_0/mlp", "llm/layers_1/mlp"]
    for r in report:
        assert r.retained_rank == 9 and r.null_dim == 96 - 9 and r.stored == "basis"
    for block, h in keys.items():
        proj = entries[f"{block}/down_proj"]
        f = h.shape[1]
        p = np.asarray(vacuum_project(jnp.eye(f), proj))
        np.testing.assert_allclose(p, p.T, atol=1e-5)
        np.testing.assert_allclose(p @ p, p, atol=1e-5)
        ph = np.asarray(vacuum_project(jnp.asarray(h), proj))
        assert np.abs(ph).max() < 1e-4 * np.abs(h).max()
        dense = {"dense": jnp.asarray(p)}
        x = np.random.default_rng(1).standard_normal((5, f)).astype(np.float32)
        np.testing.assert_allclose(vacuum_project(x, proj), vacuum_project(x, dense), atol=1e-5)


def test_threshold_modes_and_dense_storage(setup):
    *_, moments, _ = setup
    c = next(iter(moments.values()))
    _, by_rank = vacuum.vacuum_projector_from_moment(c, mode="rank", rank=60)
    assert by_rank["retained_rank"] == 60 and by_rank["stored"] == "dense"  # 60 >= 96/2
    _, none_kept = vacuum.vacuum_projector_from_moment(c, threshold=1e9, mode="absolute")
    assert none_kept["retained_rank"] == 0 and none_kept["null_dim"] == 96 and none_kept["stored"] == "identity"
    with pytest.raises(ValueError, match="rank"):
        vacuum.vacuum_projector_from_moment(c, mode="rank")


def test_delete_is_pure_matches_dense_formula_and_spares_retain_keys(setup):
    model, params, config, retain, moments, _ = setup
    projectors, _ = vacuum.build_vacuum_projectors(moments, threshold=1e-6, mode="relative")
    lora = lora_lib.init(params, rank=4, alpha=8.0, rng=jax.random.PRNGKey(0), b_std=0.5)
    before = jax.tree_util.tree_map(np.asarray, params)
    out = vle.delete(params, lora, projectors, strength=0.7)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, params))
    keys = pooled_keys(model, params, retain)
    for i in range(config.text.num_hidden_layers):
        entry = lora["llm"][f"layers_{i}"]["mlp"]["down_proj"]
        basis = np.asarray(projectors["llm"][f"layers_{i}"]["mlp"]["down_proj"]["basis"])
        p = np.eye(basis.shape[0]) - basis @ basis.T
        w = np.asarray(params["llm"][f"layers_{i}"]["mlp"]["down_proj"]["kernel"])
        expected = w - 0.7 * float(entry["scale"]) * p @ np.asarray(entry["a"]) @ np.asarray(entry["b"])
        got = np.asarray(out["llm"][f"layers_{i}"]["mlp"]["down_proj"]["kernel"])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        h = keys[f"llm/layers_{i}/mlp"]
        np.testing.assert_allclose(h @ got, h @ w, atol=1e-4 * np.abs(h @ w).max())
        assert np.abs(got - w).max() > 1e-3  # it did delete something
    zero = lora_lib.init(params, rank=4, alpha=8.0, rng=jax.random.PRNGKey(0), b_std=0.0)
    same = vle.delete(params, zero, projectors)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, same), before)


def test_delete_undoes_the_added_lora_forward(setup):
    """Forward with the LoRA "added" == forward of merge(+); delete(merge(+)) gives back the original."""
    model, params, config, retain, moments, _ = setup
    projectors, _ = vacuum.build_vacuum_projectors(moments, threshold=1e-6, mode="relative")
    lora = lora_lib.init(params, rank=4, alpha=8.0, rng=jax.random.PRNGKey(1), b_std=0.5)
    batch = retain[0]
    with_lora = model.apply({"params": params, "lora": lora, "vacuum": projectors}, **batch).logits
    merged = lora_lib.merge(params, lora, projectors)
    np.testing.assert_allclose(model.apply({"params": merged}, **batch).logits, with_lora, atol=1e-4)
    restored = vle.delete(merged, lora, projectors)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_lora_targets_by_regex_and_layers(setup):
    _, params, *_ = setup
    assert lora_lib.target_paths(params) == ["llm/layers_0/mlp/down_proj", "llm/layers_1/mlp/down_proj"]
    assert lora_lib.target_paths(params, layers=[1]) == ["llm/layers_1/mlp/down_proj"]
    assert len(lora_lib.target_paths(params, lora_lib.LM_LINEARS)) == 2 * 7
    with pytest.raises(ValueError, match="matches no Dense"):
        lora_lib.target_paths(params, r"^nothing$")


def test_distill_loss_is_zero_when_the_student_copies_the_teacher(setup):
    model, params, config, retain, _, _ = setup
    f, d = config.text.intermediate_size, config.text.hidden_size
    flat = traverse_util.flatten_dict(params)
    lora = {"llm": {}}
    for i in range(config.text.num_hidden_layers):
        w = np.asarray(flat[("llm", f"layers_{i}", "mlp", "down_proj", "kernel")])
        # a full-rank "LoRA" equal to W (a = W, b = I): B A h = W_down h exactly -> cosine distance 0
        lora["llm"][f"layers_{i}"] = {"mlp": {"down_proj": {"a": jnp.asarray(w), "b": jnp.eye(d), "scale": jnp.asarray(1.0)}}}
    _, state = model.apply({"params": params}, **retain[0], mutable=["intermediates"])
    keys = vle._keys_from(state)
    loss = vle.distill_loss(keys, params, lora, None, retain[0]["attention_mask"])
    assert float(loss) < 1e-5
    anti = {"llm": {k: {"mlp": {"down_proj": {**v["mlp"]["down_proj"], "scale": jnp.asarray(-1.0)}}}
                    for k, v in lora["llm"].items()}}
    assert float(vle.distill_loss(keys, params, anti, None, retain[0]["attention_mask"])) == pytest.approx(2.0, abs=1e-4)


@pytest.mark.parametrize("cfg", [vle.VLEraserConfig(), vle.VLEraserConfig(ce_mode="replaced", lambda_=0.3),
                                 vle.VLEraserConfig(vacuum=False, lambda_=1.0)])
def test_distillation_gradients_are_finite_and_the_step_compiles_once(setup, cfg):
    model, params, config, retain, moments, _ = setup
    projectors, _ = vacuum.build_vacuum_projectors(moments) if cfg.vacuum else (None, None)
    lora = lora_lib.init(params, cfg.rank, cfg.lora_alpha, jax.random.PRNGKey(0), b_std=cfg.lora_b_std)
    trainable, scales = lora_lib.split_trainable(lora)
    frozen = {"params": params, "lora_scales": scales, "vacuum": projectors}
    batch = dict(retain[0])
    labels = np.where(batch["attention_mask"] == 1, batch["input_ids"], tr.IGNORE_INDEX)
    labels[batch["input_ids"] == config.image_token_index] = tr.IGNORE_INDEX
    batch["labels"] = labels
    loss_fn = vle.distillation_loss_fn(model, cfg)
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))(frozen, trainable, batch, None)
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert 0.0 <= float(aux["distill"]) <= 2.0
    tx = tr.make_optimizer(tr.TrainConfig(total_steps=3, learning_rate=1e-2))
    step = tr.make_train_step(loss_fn, tx)
    state = tr.init_state(trainable, tx, 0)
    for other in retain:
        b = dict(other)
        b["labels"] = labels if other is retain[0] else np.where(other["attention_mask"] == 1, other["input_ids"], -100)
        state, _ = step(state, frozen, b)
    assert step._cache_size() == 1
