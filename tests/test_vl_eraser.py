"""VL-Eraser's pieces: LoRA tree, vacuum projector, distillation loss, deletion, the stage-1 step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import llava_inputs
from flax import traverse_util

from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.models.layers import vacuum_project
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
    moments, n = vacuum.collect_moments(model, params, retain, pooling="mean", progress=False)
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


def test_thresholds_are_capped_at_the_numerical_rank(setup):
    *_, moments, _ = setup
    c = next(iter(moments.values()))  # 9 mean-pooled images: rank 9 of 96
    _, capped = vacuum.vacuum_projector_from_moment(c, mode="rank", rank=60)
    assert capped["retained_rank"] == 9 == capped["numerical_rank"] and capped["stored"] == "basis"
    _, loose = vacuum.vacuum_projector_from_moment(c, threshold=1e-30, mode="absolute")
    assert loose["retained_rank"] == 9  # noise eigenvalues never count as retained directions
    _, none_kept = vacuum.vacuum_projector_from_moment(c, threshold=1e9, mode="absolute")
    assert none_kept["retained_rank"] == 0 and none_kept["null_dim"] == 96 and none_kept["stored"] == "identity"
    with pytest.raises(ValueError, match="rank"):
        vacuum.vacuum_projector_from_moment(c, mode="rank")
    with pytest.raises(ValueError, match="energy"):
        vacuum.vacuum_projector_from_moment(c, threshold=2.0, mode="energy")


def test_threshold_modes_match_numpy_and_dense_storage(setup):
    model, params, _, retain, _, _ = setup
    tokens, n = vacuum.collect_moments(model, params, retain, pooling="tokens", progress=False)
    c = tokens["llm/layers_0/mlp"]
    eig = np.sort(np.linalg.eigvalsh(c))[::-1]  # numpy, f64: the reference spectrum
    _, by_rank = vacuum.vacuum_projector_from_moment(c, mode="rank", rank=60)
    assert by_rank["retained_rank"] == 60 and by_rank["stored"] == "dense"  # 60 >= 96/2
    for fraction in (0.5, 0.9, 0.99):
        expected = int(np.argmax(np.cumsum(eig) / eig.sum() >= fraction)) + 1
        _, info = vacuum.vacuum_projector_from_moment(c, threshold=fraction, mode="energy")
        assert abs(info["retained_rank"] - expected) <= 1  # f32 decomposition vs f64 reference at the boundary
    _, rel = vacuum.vacuum_projector_from_moment(c, threshold=1e-2, mode="relative")
    assert abs(rel["retained_rank"] - int((eig >= 1e-2 * eig[0]).sum())) <= 1


def test_svd_of_stacked_keys_and_of_the_moment_and_eigh_agree(setup):
    model, params, _, retain, _, _ = setup
    stacked = vacuum.collect_keys(model, params, retain, "tokens", progress=False)
    spilled = vacuum.collect_keys(model, params, retain, "tokens", progress=False, stack_limit_bytes=1)
    assert stacked.kind == "keys" and spilled.kind == "moment" and stacked.count == spilled.count
    block = "llm/layers_1/mlp"
    h = stacked.blocks[block]
    np.testing.assert_allclose(spilled.blocks[block], h.astype(np.float64).T @ h / len(h), rtol=1e-5, atol=1e-8)
    spans = []
    for keys, decomposition in ((stacked, "svd"), (spilled, "svd"), (spilled, "eigh")):
        projectors, _ = vacuum.build_vacuum_projectors(keys, threshold=0.9, mode="energy", decomposition=decomposition)
        spans.append(np.asarray(vacuum_project(jnp.eye(96), lora_lib.entries(projectors)[f"{block}/down_proj"])))
    for p in spans[1:]:
        np.testing.assert_allclose(p, spans[0], atol=1e-3)


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
    d = config.text.hidden_size
    flat = traverse_util.flatten_dict(params)
    lora = {"llm": {}}
    for i in range(config.text.num_hidden_layers):
        w = np.asarray(flat[("llm", f"layers_{i}", "mlp", "down_proj", "kernel")])
        # a full-rank "LoRA" equal to W (a = W, b = I): B A h = W_down h exactly -> cosine distance 0
        lora["llm"][f"layers_{i}"] = {"mlp": {"down_proj": {"a": jnp.asarray(w), "b": jnp.eye(d), "scale": jnp.asarray(1.0)}}}
    _, state = model.apply({"params": params}, **retain[0], mutable=["intermediates"])
    keys = vle.keys_from(state)
    loss = vle.distill_loss(keys, params, lora, None, retain[0]["attention_mask"])
    assert float(loss) < 1e-5
    anti = {"llm": {k: {"mlp": {"down_proj": {**v["mlp"]["down_proj"], "scale": jnp.asarray(-1.0)}}}
                    for k, v in lora["llm"].items()}}
    assert float(vle.distill_loss(keys, params, anti, None, retain[0]["attention_mask"])) == pytest.approx(2.0, abs=1e-4)


@pytest.mark.parametrize("cfg", [vle.VLEraserConfig(), vle.VLEraserConfig(ce_mode="replaced", lambda_=0.3,
                                                                           distill_tokens="answer"),
                                 vle.VLEraserConfig(vacuum=False, lambda_=1.0, distill_tokens="all")])
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
    batch[vle.ENTITY_MASK] = np.zeros_like(labels)
    batch[vle.ENTITY_MASK][:, 1:3] = 1
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
        b[vle.ENTITY_MASK] = np.zeros_like(b["labels"])
        state, _ = step(state, frozen, b)
    assert step._cache_size() == 1


def test_the_teacher_is_the_frozen_model(setup):
    """The distillation's keys come from a LoRA-free pass: a large LoRA changes the CE, not the teacher."""
    model, params, config, retain, moments, _ = setup
    cfg = vle.VLEraserConfig(distill_tokens="all", vacuum=False)
    lora = lora_lib.init(params, 4, 8.0, jax.random.PRNGKey(0), b_std=0.5)
    trainable, scales = lora_lib.split_trainable(lora)
    batch = dict(retain[0], labels=np.where(retain[0]["attention_mask"] == 1, retain[0]["input_ids"], -100))
    _, aux = vle.distillation_loss_fn(model, cfg)({"params": params, "lora_scales": scales}, trainable, batch, None)
    _, frozen_state = model.apply({"params": params}, **retain[0], mutable=["intermediates"])
    _, lora_state = model.apply({"params": params, "lora": lora}, **retain[0], mutable=["intermediates"])
    mask = retain[0]["attention_mask"]
    expected = vle.distill_loss(vle.keys_from(frozen_state), params, lora, None, mask)
    with_lora_keys = vle.distill_loss(vle.keys_from(lora_state), params, lora, None, mask)
    assert float(aux["distill"]) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(with_lora_keys) - float(expected)) > 1e-4  # the LoRA does move later blocks' keys


def test_entity_mask_marks_the_name_wherever_it_appears():
    ids = np.array([[5, 1, 2, 3, 9, 1, 2, 0], [4, 4, 7, 7, 7, 1, 2, 3]])
    names = [[[1, 2, 3], [2, 3]], [[7]]]
    mask = vle.entity_token_mask(ids, names)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]])


def test_least_squares_scale_recovers_a_known_multiple(setup):
    """A student equal to W_down / 4 on every key gets c = 4: α = 1 then removes the FFN output exactly."""
    model, params, config, retain, _, _ = setup
    flat = traverse_util.flatten_dict(params)
    d = config.text.hidden_size
    lora = {"llm": {f"layers_{i}": {"mlp": {"down_proj": {
        "a": jnp.asarray(flat[("llm", f"layers_{i}", "mlp", "down_proj", "kernel")]), "b": jnp.eye(d),
        "scale": jnp.asarray(0.25)}}} for i in range(config.text.num_hidden_layers)}}
    batch = dict(retain[0], labels=np.where(retain[0]["attention_mask"] == 1, retain[0]["input_ids"], -100))
    scales = vle.least_squares_scales(model, params, lora, None, [batch])
    assert scales and all(v == pytest.approx(4.0, rel=1e-4) for v in scales.values())
    deleted = vle.delete(params, vle.rescale(lora, scales), None, strength=1.0)
    for i in range(config.text.num_hidden_layers):
        kernel = np.asarray(deleted["llm"][f"layers_{i}"]["mlp"]["down_proj"]["kernel"])
        assert np.abs(kernel).max() < 1e-4
