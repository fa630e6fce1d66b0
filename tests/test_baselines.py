"""The baselines (GA, GD, KL, NPO, MMUnlearner): hand-checked losses, the Fisher mask, the step plans, and
one short `unlearn_baseline` run per method on a tiny random LLaVA."""

from __future__ import annotations

import io
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.unlearn import baselines as bl
from vleraser_jax.unlearn import lora as lora_lib
from vleraser_jax.unlearn import trainer as tr
from vleraser_jax.unlearn.adapter import Adapter

LM_LINEAR_PARAMS = r"^llm/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/"


pytestmark = pytest.mark.usefixtures("quick_compiles")  # conftest: compiles dominate these runs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A complete tiny LLaVA checkpoint (1 LM block, 1 vision layer: quick to compile), its processor,
    training rows, and fixed-shape text batches (batching.tokenize + epoch_batches, batch size 2)."""
    from conftest import tiny_llava_hf_config, write_full_checkpoint
    from PIL import Image

    from vleraser_jax.data.mllmu import TrainingRow
    from vleraser_jax.data.batching import epoch_batches, group_lengths, qa_example, tokenize
    from vleraser_jax.processing import load_processor

    path = write_full_checkpoint(tmp_path_factory.mktemp("small_llava"),
                                 tiny_llava_hf_config(vision_layers=1, vision_feature_layer=-1), lm_layers=1)
    model, params, config = load_pretrained(path)
    processor = load_processor(path)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    image = buf.getvalue()
    forget_image = (TrainingRow("f1", "Who is this person?", "This is Mara Quill.", image),
                    TrainingRow("f1", "What does this person do?", "A painter born in Oslo.", image))
    forget_text = (TrainingRow("f1", "Who is Mara Quill?", "A painter born in Oslo.", None),
                   TrainingRow("f1", "What does Mara Quill do?", "Mara Quill is a painter.", None),
                   TrainingRow("f2", "Where was Mara Quill born?", "In Oslo.", None),
                   TrainingRow("f2", "What does the portrait show?", "A woman with round glasses.", None))
    retain = (TrainingRow("r1", "What does Tomas Reyd do?", "Tomas Reyd is a marine biologist.", None),
              TrainingRow("r2", "What does the portrait show?", "A woman with red hair.", None),
              TrainingRow("r2", "Who is Tomas Reyd?", "A marine biologist.", None))
    datas = [tokenize(processor, [qa_example(processor, r) for r in rows], 64) for rows in (forget_text, retain)]
    lengths = group_lengths(*datas)  # one batch shape for both sets: fewer compiles
    forget, retain_batches = (epoch_batches(d, 2, seed=0, lengths=lengths) for d in datas)
    return SimpleNamespace(model=model, params=params, config=config, processor=processor, path=path,
                           forget_image=forget_image, forget_text=forget_text, retain_rows=retain,
                           forget=forget, retain=retain_batches)


@pytest.fixture(scope="module")
def setup(small):
    return small.model, small.params, small.config, small.forget, small.retain[0]


def lora_state(params, b_std, seed=0):
    """A LoRA (adapter, trainable, frozen) whose b is N(0, b_std): θ ≠ vanilla when b_std > 0."""
    cfg = bl.BaselineConfig(method="gd", order="sequential", lora_pattern=lora_lib.LM_LINEARS)
    adapter, trainable, frozen = bl.prepare(None, params, cfg, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed + 1)
    flat = {k: (jnp.asarray(b_std * rng.standard_normal(v.shape), jnp.float32) if k[-1] == "b" else v)
            for k, v in traverse_util.flatten_dict(trainable).items()}
    return traverse_util.unflatten_dict(flat), frozen


def loss_of(adapter, method, **fields):
    """The baseline loss of `method` with these BaselineConfig fields."""
    return bl.baseline_loss_fn(adapter, bl.BaselineConfig(method=method, lora=adapter.lora, **fields))


def perturbed(params, scale=0.05, seed=3):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda v: jnp.asarray((lambda x: x + scale * x.std() * rng.standard_normal(x.shape))(np.asarray(v)),
                              jnp.float32), params)


def random_mask(params, seed=0):
    selected, _ = bl.select_modules(params, lora_lib.LM_LINEARS)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.random(x.shape) < 0.5), selected)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_sequence_nll(logits, labels):
    logp = np_log_softmax(logits)[:, :-1]
    targets = labels[:, 1:]
    valid = targets != tr.IGNORE_INDEX
    picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    return -(picked * valid).sum(1), valid.sum(1)


# ------------------------------------------------------------------ losses
# (each fixture below evaluates everything its tests need in one compiled program: compiles dominate here)


@pytest.fixture(scope="module")
def lora_case(setup):
    """θ = vanilla + a LoRA with b ≠ 0; ref (NPO) = a perturbed copy of vanilla, so NLL_θ − NLL_ref ≠ 0."""
    model, params, _, forget, retain = setup
    trainable, frozen = lora_state(params, 0.02)
    frozen = {**frozen, "ref": perturbed(params)}
    return Adapter(model, lora=True), trainable, frozen, forget[0], retain


@pytest.fixture(scope="module")
def forget_grads(lora_case):
    adapter, trainable, frozen, batch, _ = lora_case
    forget = {"forget": batch}

    @jax.jit
    def run(t):
        grad = lambda f: jax.grad(lambda t: f(t))(t)
        return {
            "ga": grad(lambda t: loss_of(adapter, "ga")(frozen, t, forget, None)[0]),
            "nll": grad(lambda t: tr.causal_lm_loss(adapter.logits(frozen, t, batch), batch["labels"])),
            "npo_beta_to_0": grad(lambda t: loss_of(adapter, "npo", beta=1e-6, npo_nll="batch_mean")(
                frozen, t, forget, None)[0]),
            "npo_losses": {r: loss_of(adapter, "npo", beta=0.4, npo_nll=r)(frozen, t, forget, None) for r in bl.NPO_NLL},
            "logits": adapter.logits(frozen, t, batch),
            "ref_logits": adapter.reference_logits(frozen, batch),
        }

    return run(trainable)


def test_ga_gradient_is_exactly_minus_the_nll_gradient(forget_grads):
    for a, b in zip(jax.tree_util.tree_leaves(forget_grads["ga"]), jax.tree_util.tree_leaves(forget_grads["nll"])):
        np.testing.assert_array_equal(np.asarray(a), -np.asarray(b))
        assert np.abs(np.asarray(a)).max() > 0


def test_npo_loss_equals_the_formula_on_hand_computed_nlls(lora_case, forget_grads):
    batch, beta = lora_case[3], 0.4
    nll, count = np_sequence_nll(forget_grads["logits"], batch["labels"])
    ref_nll, ref_count = np_sequence_nll(forget_grads["ref_logits"], batch["labels"])
    assert (count > 0).all() and np.abs(nll - ref_nll).min() > 1e-3  # the reference really differs
    for reduction in bl.NPO_NLL:
        d = nll.sum() / count.sum() - ref_nll.sum() / ref_count.sum() if reduction == "batch_mean" else nll - ref_nll
        expected = np.mean((2 / beta) * np.logaddexp(0.0, -beta * d))  # −(2/β) log σ(βd)
        loss, aux = forget_grads["npo_losses"][reduction]
        assert float(loss) == pytest.approx(expected, rel=1e-5), reduction
        assert float(aux["npo_log_ratio"]) == pytest.approx(np.mean(d), rel=1e-4, abs=1e-6), reduction


@pytest.mark.parametrize("reduction", bl.NPO_NLL)
def test_npo_derivative_is_2_sigmoid_weighted_ga(reduction):
    """∂L/∂nll_i = −2σ(−βd)/Σcount ("batch_mean") or −2σ(−βd_i)/B ("sequence"): NPO's gradient is GA's
    (token-mean resp. mean of sequence sums) weighted by 2σ(−βd) ∈ (0, 2), → 1 as β → 0 or at θ = ref."""
    rng = np.random.default_rng(0)
    nll, ref = rng.uniform(5, 20, 4), rng.uniform(5, 20, 4)
    count = np.array([3.0, 5.0, 2.0, 4.0])
    for beta in (2.0, 0.4, 1e-6):
        g = np.asarray(jax.grad(lambda x: bl.npo_loss(x, count, ref, count, beta, reduction)[0])(jnp.asarray(nll)))
        if reduction == "batch_mean":
            d = nll.sum() / count.sum() - ref.sum() / count.sum()
            expected = -2 / (1 + np.exp(beta * d)) / count.sum() * np.ones(4)
        else:
            expected = -2 / (1 + np.exp(beta * (nll - ref))) / len(nll)
        np.testing.assert_allclose(g, expected, rtol=1e-5)
    np.testing.assert_allclose(g, -(1 / count.sum() if reduction == "batch_mean" else 1 / 4) * np.ones(4), rtol=1e-5)


def test_npo_gradient_tends_to_ga_as_beta_vanishes(forget_grads):
    """On the model: ∇L_NPO(β → 0) = GA's gradient −∇NLL̄_θ ("batch_mean", the default), although d ≠ 0
    (the "sequence" reduction's limit, −mean_i ∇nll_i, follows from the derivative test by the chain rule)."""
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
    npo, ga = flat(forget_grads["npo_beta_to_0"]), flat(forget_grads["ga"])
    np.testing.assert_allclose(npo, ga, rtol=1e-4, atol=1e-6 * np.abs(ga).max())


@pytest.fixture(scope="module")
def kl_results(lora_case, setup):
    """KL at θ = vanilla and at a θ far enough from it (b ~ N(0, 0.1²)) that forward and reverse KL differ."""
    adapter, _, frozen, forget, retain = lora_case
    moved, _ = lora_state(setup[1], 0.1, seed=5)
    at_vanilla = jax.tree_util.tree_map(lambda x: x * 0 if x.shape[0] == 16 else x, moved)  # b = 0: θ = vanilla
    assert all(float(jnp.abs(v).max()) == 0 for k, v in traverse_util.flatten_dict(at_vanilla).items() if k[-1] == "b")
    loss_fn = loss_of(adapter, "kl", kl_weight=0.5, retain_weight=2.0)

    @jax.jit
    def run(t0, t1):
        return {"paired": jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
                    frozen, t1, {"forget": forget, "retain": retain}, None),
                "at_vanilla": loss_fn(frozen, t0, {"retain": retain}, None)[1],
                "vanilla_logits": adapter.vanilla_logits(frozen, retain), "logits": adapter.logits(frozen, t1, retain)}

    return run(at_vanilla, moved), retain


def test_a_combined_forget_and_retain_batch_is_finite_under_jit(kl_results):
    """KL (the loss with every term) on a paired batch: −NLL̄_f + w_r NLL̄_r + w_kl KL. Each method's own
    loss runs under jit in `test_unlearn_baseline_runs_end_to_end` (the trainer refuses non-finite values)."""
    (loss, aux), grads = kl_results[0]["paired"]
    assert set(aux) == {"forget_nll", "retain_nll", "kl"} and float(aux["kl"]) > 0
    expected = -float(aux["forget_nll"]) + 2.0 * float(aux["retain_nll"]) + 0.5 * float(aux["kl"])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(g).all() for g in leaves) and max(np.abs(g).max() for g in leaves) > 0


def test_kl_is_zero_at_the_vanilla_model_and_is_forward_kl(kl_results):
    out, retain = kl_results
    assert abs(float(out["at_vanilla"]["kl"])) < 1e-6
    aux = out["paired"][0][1]
    p_van, p_theta = np_log_softmax(out["vanilla_logits"]), np_log_softmax(out["logits"])
    m = retain["attention_mask"][..., None]
    forward = float((np.exp(p_van) * (p_van - p_theta) * m).sum() / len(m))
    reverse = float((np.exp(p_theta) * (p_theta - p_van) * m).sum() / len(m))
    assert float(aux["kl"]) == pytest.approx(forward, rel=1e-4)
    assert abs(forward - reverse) > 1e-3 * forward  # the direction is tested, not only the magnitude
    nll, count = np_sequence_nll(out["logits"], retain["labels"])
    assert float(aux["retain_nll"]) == pytest.approx(nll.sum() / count.sum(), rel=1e-5)


# ------------------------------------------------------------------ MMUnlearner


@pytest.fixture(scope="module")
def fishers(small):
    return tuple(bl.fisher_diagonals(small.model, small.params, [small.forget, small.retain]))


def test_fisher_is_the_mean_of_squared_batch_gradients(setup, fishers):
    model, params, _, forget, _ = setup

    @jax.jit
    def grad_of(p, batch):  # the full model's gradient, written without fisher_diagonal
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return jax.grad(lambda p: tr.causal_lm_loss(model.apply({"params": p}, **inputs).logits, batch["labels"]))(p)

    def grad(batch):
        return {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(grad_of(params, batch)).items()}

    grads = [grad(b) for b in forget]
    fisher = traverse_util.flatten_dict(fishers[0])
    assert set(fisher) == {k for k in grads[0] if "/".join(k[:-1]) in lora_lib.target_paths(params, lora_lib.LM_LINEARS)}
    for k, v in fisher.items():
        expected = (grads[0][k] ** 2 + grads[1][k] ** 2) / 2
        np.testing.assert_allclose(np.asarray(v), expected, rtol=2e-4, atol=1e-12 * expected.max())
        assert expected.max() > 0


def test_mask_selects_exactly_forget_over_retain_fisher_at_least_one(fishers):
    f = {"w": jnp.asarray([0.0, 1e-3, 2e-3, 0.0, 5.0, 1e-3], jnp.float32)}
    r = {"w": jnp.asarray([0.0, 1e-3, 1e-3, 1.0, 0.0, 2e-3], jnp.float32)}
    # 0/0 -> ratio 1 (selected, as SFRon.py's ε gives); equal; larger; zero forget; F_r = 0; smaller
    np.testing.assert_array_equal(bl.saliency_mask(f, r)["w"], [True, True, True, False, True, False])
    mask = bl.saliency_mask(*fishers)
    for (k, m), fv, rv in zip(traverse_util.flatten_dict(mask).items(),
                              traverse_util.flatten_dict(fishers[0]).values(),
                              traverse_util.flatten_dict(fishers[1]).values()):
        fv, rv = np.asarray(fv, np.float64), np.asarray(rv, np.float64)
        np.testing.assert_array_equal(np.asarray(m), (fv + 1e-15) / (rv + 1e-15) >= 1.0)
        clear = (rv > 0) & (np.abs(fv / np.where(rv > 0, rv, 1) - 1) > 1e-5)  # away from ties: plain F_f/F_r ≥ 1
        np.testing.assert_array_equal(np.asarray(m)[clear], (fv / np.where(rv > 0, rv, 1) >= 1)[clear])
    report = bl.mask_report(mask)
    assert 0 < report["selected_fraction"] < 1


def test_masked_forget_step_clips_then_masks_as_the_reference(setup):
    """MMUnlearner's forget step (MLLMU_manifold.py): the whole gradient clipped to norm c (torch's
    clip_grad_norm_: × min(1, c / (‖g‖ + 1e-6))), then multiplied by the mask; unselected weights do not move
    in one AdamW step from fresh moments. A retain step is clipped and not masked."""
    model, params, _, forget, retain = setup
    cfg = bl.BaselineConfig(method="mmunlearner", lora=False, trainable=LM_LINEAR_PARAMS, order="interleaved")
    mask = random_mask(params)
    adapter, trainable, frozen = bl.prepare(model, params, cfg, mask=mask)
    loss_fn = bl.baseline_loss_fn(adapter, cfg)
    batch = {"forget": forget[0]}
    plain = jax.jit(jax.grad(lambda t: -tr.causal_lm_loss(adapter.logits(frozen, t, forget[0]), forget[0]["labels"])))(
        trainable)
    c = 0.05
    hook = bl.clip_then_mask(c)
    grads = jax.jit(lambda g: hook(g, frozen, batch))(plain)
    norm = np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree_util.tree_leaves(plain)))
    assert norm > c  # the clip is active
    flat_mask, flat_plain = traverse_util.flatten_dict(mask), traverse_util.flatten_dict(plain)
    for k, g in traverse_util.flatten_dict(grads).items():
        m = np.asarray(flat_mask[k])
        np.testing.assert_array_equal(np.asarray(g)[~m], 0.0)
        np.testing.assert_allclose(np.asarray(g)[m], np.asarray(flat_plain[k])[m] * c / (norm + 1e-6), rtol=1e-5)
    retain_grads = hook(plain, frozen, {"retain": retain})
    for k, g in traverse_util.flatten_dict(retain_grads).items():
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_plain[k]) * c / (norm + 1e-6), rtol=1e-5)
    tx = tr.make_optimizer(tr.TrainConfig(total_steps=2, learning_rate=1e-2, max_grad_norm=None))
    step = tr.make_train_step(loss_fn, tx, gradient_fn=hook)
    state, _ = step(tr.init_state(trainable, tx, 0), frozen, batch)
    moved = 0
    for k, new in traverse_util.flatten_dict(state.trainable).items():
        old, m = np.asarray(traverse_util.flatten_dict(trainable)[k]), np.asarray(flat_mask[k])
        np.testing.assert_array_equal(np.asarray(new)[~m], old[~m])
        moved += int((np.asarray(new)[m] != old[m]).sum())
    assert moved > 0.5 * sum(int(np.asarray(m).sum()) for m in flat_mask.values())


def test_epoch_batches_cover_every_row_once_with_fixed_shapes():
    from vleraser_jax.data.batching import Tokenized, epoch_batches

    n, length = 5, 24
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90, (n, length))
    mask = np.zeros((n, length), np.int32)
    for i, real in enumerate([9, 17, 12, 5, 20]):
        mask[i, :real] = 1
    ids = ids * mask
    labels = np.where(mask == 1, ids, tr.IGNORE_INDEX)
    image_index = np.array([0, -1, 1, -1, -1])
    data = Tokenized(ids, labels, mask, image_index, rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    batches = epoch_batches(data, batch_size=2, seed=0)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 24), (2, 24)]  # image rows, then text rows
    assert all(("pixel_values" in b) == (i == 0) for i, b in enumerate(batches))
    seen = []
    for b in batches:
        for row, lab in zip(b["input_ids"], b["labels"]):
            if (lab != tr.IGNORE_INDEX).any():  # filler rows carry no label
                seen.append(next(i for i in range(n) if (ids[i, :len(row)] == row).all() and mask[i].sum() <= len(row)))
    assert sorted(seen) == list(range(n))


# ------------------------------------------------------------------ schedules


def reference_interleaving(n_forget, n_retain):
    """MMUnlearner's MLLMU_manifold.py loop, step kinds only (forget_freq = n_r // n_f, forget loader once)."""
    kinds, left, freq = [], n_forget, n_retain // n_forget
    for it in range(n_retain):
        if it % freq == 0 and left:
            kinds.append("F")
            left -= 1
        kinds.append("R")
    return kinds


def kinds_of(plan):
    return ["F" * int(f >= 0) + "R" * int(r >= 0) for f, r in plan]


def test_step_plans_follow_the_reference_loops():
    plan = bl.step_plan("forget", 3, epochs=2)
    assert kinds_of(plan) == ["F"] * 6 and list(plan[:, 0]) == list(range(6))
    plan = bl.step_plan("sequential", 2, 3)  # MLLMU-Bench GD / KL: the forget pass, then the retain pass
    assert kinds_of(plan) == ["F", "F", "R", "R", "R"]
    assert list(plan[:, 0]) == [0, 1, -1, -1, -1] and list(plan[:, 1]) == [-1, -1, 0, 1, 2]
    for n_f, n_r in [(2, 5), (3, 3), (1, 4), (4, 9), (5, 12)]:
        assert kinds_of(bl.step_plan("interleaved", n_f, n_r)) == reference_interleaving(n_f, n_r)
    assert kinds_of(bl.step_plan("interleaved", 3, 3)) == ["F", "R"] * 3  # equal sizes: strict alternation
    assert kinds_of(bl.step_plan("interleaved", 4, 2)) == ["F", "R", "F", "R"]  # n_r < n_f: the reference divides by 0
    assert kinds_of(bl.step_plan("paired", 2, 7)) == ["FR", "FR"]
    plan = bl.step_plan("sequential", 1, 2, epochs=None, steps=7)  # a step budget cycles the epoch template
    assert kinds_of(plan) == ["F", "R", "R", "F", "R", "R", "F"]
    assert list(plan[:, 0]) == [0, -1, -1, 1, -1, -1, 2] and list(plan[:, 1]) == [-1, 0, 1, -1, 2, 3, -1]
    assert len(bl.step_plan("forget", 4, epochs=0.5)) == 2
    schedule = bl.PairedSchedule(bl.step_plan("interleaved", 1, 2), lambda i: {"f": i}, lambda j: {"r": j})
    assert [schedule(s) for s in range(len(schedule))] == [{"forget": {"f": 0}}, {"retain": {"r": 0}},
                                                          {"retain": {"r": 1}}]
    assert (schedule.forget_steps, schedule.retain_steps) == (1, 2)
    with pytest.raises(ValueError, match="retain"):
        bl.step_plan("sequential", 2, 0)
    with pytest.raises(ValueError, match="retain batches"):
        bl.PairedSchedule(bl.step_plan("paired", 1, 1), lambda i: {}, None)


def test_registry_and_config_validation():
    assert set(bl.BASELINES) == set(bl.METHOD_NAMES)
    title, cfg = bl.baseline_config("npo")
    assert title == "NPO" and cfg.beta == 0.1 and cfg.npo_nll == "sequence" and cfg.order == "paired"
    assert cfg.lora and cfg.lora_rank == 16 and cfg.lora_alpha == 16
    _, mllmu = bl.baseline_config("npo", variant="mllmu")
    assert (mllmu.beta, mllmu.npo_nll, mllmu.order) == (0.4, "batch_mean", "forget")
    assert bl.baseline_config("gd")[1].order == "paired" and bl.baseline_config("gd", variant="mllmu")[1].order == "sequential"
    assert bl.baseline_config("mmunlearner")[1].fisher_sets == "mmunlearner"
    assert bl.baseline_config("mmunlearner")[1].lora is False
    run = bl.reference_run_settings("gd")
    assert (run.batch_size, run.learning_rate) == (4, 2e-5)
    with pytest.raises(ValueError, match="unknown baseline settings"):
        bl.baseline_config("ga", {"nope": 1})
    with pytest.raises(ValueError, match="lora=False"):
        bl.baseline_config("mmunlearner", {"lora": True})
    with pytest.raises(ValueError, match="order"):
        bl.BaselineConfig(order="sideways")


def test_fisher_rows_follow_the_chosen_sets():
    from vleraser_jax.data.mllmu import TrainingRow

    img, txt = (lambda p: TrainingRow(p, "q", "a", b"png")), (lambda p: TrainingRow(p, "q", "a", None))
    forget, retain = [img("f"), txt("f")], [img("r"), txt("r")]
    full = forget + retain
    assert bl.fisher_rows(forget, retain, full, "retain") == (forget, retain)
    # MMUnlearner's language mask: forget image rows vs retain image rows + every person's text-only rows
    assert bl.fisher_rows(forget, retain, full, "mmunlearner") == ([forget[0]], [retain[0], forget[1], retain[1]])


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def e2e(small):
    from vleraser_jax.data import mllmu

    bench = mllmu.Benchmark(root="", forget_ratio=5, forget=(), test=(), retain=(), real=(),
                            forget_train=small.forget_image, retain_train=small.retain_rows,
                            full_train=small.forget_image + small.forget_text + small.retain_rows)
    return small.model, small.params, small.processor, bench, small


@pytest.mark.parametrize("name", bl.METHOD_NAMES)
def test_unlearn_baseline_runs_end_to_end(e2e, name, tmp_path):
    from vleraser_jax.experiment.artifacts import save_method_run
    from vleraser_jax.experiment.methods import MethodRun

    model, params, processor, bench, small = e2e
    run = tr.RunSettings(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0, max_length=64, seed=0)
    out = tmp_path / name if name == "gd" else None
    # GA forgets the image rows (the vision path); the others text rows, to keep compiles few
    # (MMUnlearner's Fisher needs image rows: its preserve sets are image rows)
    forget_rows = bench.forget_train if name in ("ga", "mmunlearner") else small.forget_text[:2]
    messages = []
    unlearned, lora, info = bl.unlearn_baseline(model, params, processor, forget_rows, bench.retain_train, name,
                                                {"epochs": None}, run, full_rows=bench.full_train, progress=False,
                                                log=messages.append)
    if out is not None:
        save_method_run(out, MethodRun("GD", unlearned, info, lora), model.config, source_dir=small.path)
    flat_in, flat_out = traverse_util.flatten_dict(params), traverse_util.flatten_dict(unlearned)
    assert set(flat_in) == set(flat_out)
    for k, v in flat_in.items():
        assert flat_out[k].shape == v.shape and flat_out[k].dtype == v.dtype and np.isfinite(np.asarray(flat_out[k])).all()
    changed = {"/".join(k) for k, v in flat_in.items() if not np.array_equal(np.asarray(v), np.asarray(flat_out[k]))}
    assert changed
    if bl.BASELINES[name][1].get("lora", True):  # a merged LoRA touches MLLMU-Bench's PEFT targets, and is returned
        assert lora is not None and info["lora_merge_weight"] == 1.0
        merged = traverse_util.flatten_dict(lora_lib.merge(params, lora))
        for k, v in merged.items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_out[k]), err_msg="/".join(k))
        targets = lora_lib.target_paths(params, lora_lib.MLLMU_PEFT_TARGETS)
        assert all(k.split("/")[-1] == "kernel" and "/".join(k.split("/")[:-1]) in targets for k in changed)
        assert any(t.startswith("vision/") for t in targets)  # CLIP's q/k/v, as PEFT's name-suffix match does
    else:  # full-parameter training: no adapter exists
        assert lora is None and "lora_merge_weight" not in info
    expected = {"ga": (3, 0), "npo": (3, 3), "gd": (3, 3), "kl": (3, 3), "mmunlearner": (1, 2)}[name]  # paired
    assert set(info["history"][0]) >= {"loss", "grad_norm", "forget_nll"}
    assert (info["steps"], info["forget_steps"], info["retain_steps"]) == (3, *expected)
    assert info["train_seconds"] > 0 and messages and len(info["history"]) == 3
    assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in info["history"])
    if name == "mmunlearner":
        assert info["mask_seconds"] > 0 and 0 < info["mask_report"]["selected_fraction"] <= 1
        assert any(k.startswith("llm/embed") for k in changed)  # the reference leaves non-linears unmasked
    if out is not None:
        assert (out / "model" / "config.json").exists() and (out / "artifacts" / "meta.json").exists()
        assert (out / "adapter" / "adapter_config.json").exists()  # its numbers: tests/test_peft_adapter.py
        _, reloaded, _ = load_pretrained(out / "model")
        for k, v in traverse_util.flatten_dict(reloaded).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_out[k]))


def test_method_settings_route_to_where_run_method_reads_them():
    from pathlib import Path

    from vleraser_jax.config import load_config
    from vleraser_jax.experiment import methods as R

    c = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_llava.py", [])
    swept = R.with_method_settings(c, "gd", {"learning_rate": 5e-4, "retain_weight": 0.5, "batch_size": 2})
    title, settings, run = R.baseline_method_config(swept, "gd")
    assert title == "GD" and settings.retain_weight == 0.5 and settings.method == "gd"
    assert (run.learning_rate, run.batch_size) == (5e-4, 2)
    # the input config is untouched, and the other baselines keep their own learning rates
    assert R.baseline_method_config(c, "gd")[2].learning_rate == c.baselines.gd.learning_rate
    assert R.baseline_method_config(swept, "ga")[2].learning_rate == c.baselines.ga.learning_rate
    _, cfg, vstage = R.method_config(R.with_method_settings(c, "vl_eraser_no_ce", {"deletion_strength": 2.0, "steps": 7}),
                                     "vl_eraser_no_ce")
    assert (cfg.deletion_strength, cfg.lambda_, vstage.steps) == (2.0, 1.0, 7)
    # the paper row: its own section's settings, the paper's choices fixed over them, VL-Eraser's untouched
    paper = R.with_method_settings(c, "vl_eraser_paper", {"deletion_strength": 16.0, "vacuum_source": "image+text"})
    title, cfg, _ = R.method_config(paper, "vl_eraser_paper")
    assert title == "VL-Eraser (paper)" and cfg.deletion_strength == 16.0
    assert (cfg.vacuum_source, cfg.pooling, cfg.distill_tokens, cfg.deletion_scale) == ("image", "mean", "all", "raw")
    assert R.method_config(paper, "vl_eraser")[1].deletion_strength == c.vl_eraser.deletion_strength
    with pytest.raises(ValueError, match="unknown settings"):
        R.with_method_settings(c, "npo", {"betta": 0.1})
    with pytest.raises(ValueError, match="unknown settings"):
        R.with_method_settings(c, "vl_eraser", {"beta": 0.1})
