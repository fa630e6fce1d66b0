"""The shared trainer: determinism, exact resume, accumulation, regex partitioning, divergence, CE."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import llava_inputs

from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.unlearn import trainer as tr


def regression_problem(seed=0):
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal((5, 3)).astype(np.float32)
    x = rng.standard_normal((64, 5)).astype(np.float32)
    y = x @ w_true

    def batch_fn(step):  # a pure function of the step, as the trainer requires
        idx = np.random.default_rng([seed, step]).choice(64, size=8, replace=False)
        return {"x": x[idx], "y": y[idx]}

    def loss_fn(frozen, trainable, batch, rng):
        pred = batch["x"] @ trainable["w"] * frozen["scale"] + trainable["b"]
        return jnp.mean((pred - batch["y"]) ** 2), {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}

    trainable = {"w": jnp.zeros((5, 3)), "b": jnp.zeros((3,))}
    return loss_fn, trainable, {"scale": jnp.asarray(1.0)}, batch_fn


CFG = tr.TrainConfig(total_steps=40, learning_rate=0.3, warmup_steps=4, log_every=5, progress=False)


def test_loss_decreases_and_runs_are_deterministic():
    loss_fn, trainable, frozen, batch_fn = regression_problem()
    a = tr.train(loss_fn, trainable, frozen, batch_fn, CFG)
    b = tr.train(loss_fn, trainable, frozen, batch_fn, CFG)
    assert a.history[-1]["loss"] < 0.1 * a.history[0]["loss"]
    assert [h["step"] for h in a.history] == list(range(5, 41, 5))
    for k in a.trainable:
        np.testing.assert_array_equal(a.trainable[k], b.trainable[k])


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    loss_fn, trainable, frozen, batch_fn = regression_problem()
    reference = tr.train(loss_fn, trainable, frozen, batch_fn, CFG)
    cfg = dataclasses.replace(CFG, checkpoint_dir=str(tmp_path / "ckpt"), save_every=10, grad_accum_steps=1)
    first = tr.train(loss_fn, trainable, frozen, batch_fn, cfg, stop_after=17)  # "killed" after step 17
    assert first.resumed_from is None
    second = tr.train(loss_fn, trainable, frozen, batch_fn, cfg)
    assert second.resumed_from == 17
    for k in reference.trainable:
        np.testing.assert_array_equal(second.trainable[k], reference.trainable[k])


def test_gradient_accumulation_equals_the_big_batch():
    loss_fn, trainable, frozen, _ = regression_problem()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    y = rng.standard_normal((8, 3)).astype(np.float32)
    halves = lambda step: {"x": x[4 * (step % 2): 4 * (step % 2) + 4], "y": y[4 * (step % 2): 4 * (step % 2) + 4]}
    whole = lambda step: {"x": x, "y": y}
    cfg = dataclasses.replace(CFG, total_steps=2, warmup_steps=0, schedule="constant", max_grad_norm=None)
    accumulated = tr.train(loss_fn, trainable, frozen, halves, dataclasses.replace(cfg, grad_accum_steps=2))
    single = tr.train(loss_fn, trainable, frozen, whole, dataclasses.replace(cfg, total_steps=1))
    for k in single.trainable:
        np.testing.assert_allclose(accumulated.trainable[k], single.trainable[k], atol=1e-6)
        assert np.abs(np.asarray(single.trainable[k])).max() > 0


def test_partition_by_regex_roundtrip():
    params = {"llm": {"layers_0": {"mlp": {"w": 1}, "attn": {"w": 2}}}, "projector": {"w": 3}}
    train, frozen = tr.partition(params, r"projector|/mlp/")
    assert train == {"llm": {"layers_0": {"mlp": {"w": 1}}}, "projector": {"w": 3}}
    assert frozen == {"llm": {"layers_0": {"attn": {"w": 2}}}}
    assert tr.merge(train, frozen) == params
    with pytest.raises(ValueError, match="matches no parameter"):
        tr.partition(params, "nothing_here")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    loss_fn, trainable, frozen, batch_fn = regression_problem()

    def poisoned(step):
        batch = batch_fn(step)
        if step >= 12:
            batch = {"x": batch["x"] * np.nan, "y": batch["y"]}
        return batch

    cfg = dataclasses.replace(CFG, checkpoint_dir=str(tmp_path / "ckpt"), save_every=10)
    with pytest.raises(tr.TrainingDiverged, match=r"step 15: non-finite .*loss.*last good checkpoint"):
        tr.train(loss_fn, trainable, frozen, poisoned, cfg)
    resumed = tr.train(loss_fn, trainable, frozen, batch_fn, dataclasses.replace(cfg, total_steps=10))
    assert resumed.resumed_from == 10 and np.isfinite(np.asarray(resumed.trainable["w"])).all()


def test_causal_lm_loss_equals_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (3, 7))
    labels[:, :3] = tr.IGNORE_INDEX
    labels[2, :] = tr.IGNORE_INDEX  # a row with nothing to learn
    ours = float(tr.causal_lm_loss(jnp.asarray(logits), jnp.asarray(labels)))
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:, :-1]).reshape(-1, 11), torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100
    )
    assert ours == pytest.approx(float(ref), rel=1e-6)


def test_trains_only_the_selected_subtree_of_a_real_model(tiny_llava_dir):
    path, _ = tiny_llava_dir
    model, params, config = load_pretrained(path)
    ids, mask, pixels = llava_inputs(np.random.default_rng(0), image_tokens=config.num_image_tokens)
    labels = np.where(mask == 1, ids, tr.IGNORE_INDEX)
    labels[ids == config.image_token_index] = tr.IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}
    trainable, frozen = tr.partition(params, r"^projector/")

    def loss_fn(frozen, trainable, batch, rng):
        logits = model.apply({"params": tr.merge(trainable, frozen)}, input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
        return tr.causal_lm_loss(logits, batch["labels"]), {}

    cfg = dataclasses.replace(CFG, total_steps=8, learning_rate=3e-3, log_every=1)
    result = tr.train(loss_fn, trainable, frozen, lambda step: batch, cfg)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert set(result.trainable) == {"projector"}
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), result.trainable, trainable)
    assert min(jax.tree_util.tree_leaves(moved)) > 0


def test_lr_multipliers_scale_each_modules_update():
    """A module with factor k moves exactly k times as far as with factor 1 (AdamW's first step is lr·sign)."""
    params = {"vision": {"w": jnp.ones((3,))}, "llm": {"w": jnp.ones((3,))}}
    grads = {"vision": {"w": jnp.array([1.0, -2.0, 3.0])}, "llm": {"w": jnp.array([1.0, -2.0, 3.0])}}

    def moved(multipliers):
        cfg = tr.TrainConfig(total_steps=1, learning_rate=0.1, lr_multipliers=multipliers, max_grad_norm=None)
        tx = tr.make_optimizer(cfg)
        updates, _ = tx.update(grads, tx.init(params), params)
        return jax.tree_util.tree_map(np.asarray, updates)

    base, scaled = moved(()), moved((("^vision/", 0.1), ("vision|llm", 3.0)))
    np.testing.assert_allclose(scaled["vision"]["w"], 0.1 * base["vision"]["w"], rtol=1e-6)  # first match wins
    np.testing.assert_allclose(scaled["llm"]["w"], 3.0 * base["llm"]["w"], rtol=1e-6)
    assert np.abs(base["llm"]["w"]).min() > 0


def _optax_schedule(cfg):
    """The schedule as optax's own functions build it (what make_optimizer baked in before its numbers moved to
    the optimizer state)."""
    import optax

    updates = max(cfg.total_steps // cfg.grad_accum_steps, 1)
    warmup = min(cfg.warmup_steps // cfg.grad_accum_steps, updates)
    decay_steps = max(updates - warmup, 1)
    decay = {"cosine": optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.end_lr_factor),
             "linear": optax.linear_schedule(cfg.learning_rate, cfg.learning_rate * cfg.end_lr_factor, decay_steps),
             "constant": optax.constant_schedule(cfg.learning_rate)}[cfg.schedule]
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


@pytest.mark.parametrize("schedule", tr.SCHEDULES)
@pytest.mark.parametrize("warmup,end,steps,accum", [(100, 0.0, 3000, 1), (0, 0.1, 50, 1), (10, 0.0, 7, 1),
                                                    (20, 0.5, 10, 1), (8, 0.2, 40, 4)])
def test_schedule_equals_optax_schedules(schedule, warmup, end, steps, accum):
    cfg = tr.TrainConfig(total_steps=steps, learning_rate=5e-4, warmup_steps=warmup, end_lr_factor=end,
                         schedule=schedule, grad_accum_steps=accum)
    counts = jnp.arange(steps // accum + 5)
    np.testing.assert_allclose(jax.vmap(tr.learning_rate_schedule(cfg))(counts),
                               jax.vmap(_optax_schedule(cfg))(counts), rtol=1e-6, atol=1e-6 * cfg.learning_rate)
    # (f32 rounding of cos near its end is ~1e-7 of the peak; relative error there is larger)


def test_optimizer_steps_follow_the_schedule_and_share_one_program():
    """The update is the schedule's lr times AdamW's direction at every step, and two configs that differ only in
    learning rate, warmup, length and decay compile to the same program (their numbers are optimizer state)."""
    loss_fn, trainable, frozen, batch_fn = regression_problem()
    cfgs = [tr.TrainConfig(total_steps=6, learning_rate=0.3, warmup_steps=2, max_grad_norm=None, weight_decay=0.1),
            tr.TrainConfig(total_steps=9, learning_rate=0.01, warmup_steps=0, max_grad_norm=None, weight_decay=0.5,
                           end_lr_factor=0.3)]
    texts = []
    for cfg in cfgs:
        tx = tr.make_optimizer(cfg)
        step = tr.make_train_step(loss_fn, tx)
        state = tr.init_state(trainable, tx, 0)
        texts.append(step.lower(state, frozen, batch_fn(0)).as_text())
    assert texts[0] == texts[1]
    with pytest.raises(ValueError, match="schedule must be one of"):
        tr.make_optimizer(dataclasses.replace(cfgs[0], schedule="exponential"))
    # the lr the step applies: AdamW without decay on a vector is -lr · m̂/(√v̂ + eps)
    cfg = tr.TrainConfig(total_steps=5, learning_rate=0.2, warmup_steps=2, max_grad_norm=None)
    tx, lr = tr.make_optimizer(cfg), tr.learning_rate_schedule(cfg)
    params, grads = {"b": jnp.ones((3,))}, {"b": jnp.array([1.0, -2.0, 0.5])}
    state = tx.init(params)
    for count in range(5):
        updates, state = tx.update(grads, state, params)
        np.testing.assert_allclose(np.abs(updates["b"]), float(lr(count)) * np.ones(3), rtol=1e-5)


def test_a_checkpoint_of_another_state_structure_is_refused_by_name(tmp_path):
    """A stage checkpoint written by an older trainer (a plain AdamW state, before the schedule moved into the
    optimizer state) must not resume silently or fail obscurely: the error names the directory and the step."""
    import optax

    loss_fn, trainable, frozen, batch_fn = regression_problem()
    cfg = tr.TrainConfig(total_steps=4, learning_rate=0.1, checkpoint_dir=str(tmp_path / "ckpt"), save_every=2,
                         progress=False)
    old = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1))
    manager = tr._checkpoint_manager(cfg)
    tr._save(manager, tr._fresh_state(trainable, old, 0).replace(step=jnp.asarray(2, jnp.int32)))
    manager.close()
    with pytest.raises(ValueError, match=r"ckpt: the checkpoint of step 2 does not match"):
        tr.train(loss_fn, trainable, frozen, batch_fn, cfg)
