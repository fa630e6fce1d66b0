"""VL-Eraser on a constructed FFN whose knowledge lives in known orthogonal key subspaces.

Keys h ∈ R^F: retain image keys span S_image, retain text keys S_text, forget keys S_forget (mutually
orthogonal, each a random subspace). The real pieces run on them: the vacuum projector (svd of the stacked
keys, energy threshold), the cosine distillation through the trainer's step, the least-squares deletion
scale and the deletion. With the image+text vacuum, deletion removes the forget outputs and leaves the retain
text outputs as they were; with the image-only vacuum (the paper's), the same deletion also moves the outputs
the text keys read: the LoRA's input directions outside S_forget are never trained, and only P removes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vleraser_jax.unlearn import lora as lora_lib
from vleraser_jax.unlearn import trainer as tr
from vleraser_jax.unlearn import vacuum
from vleraser_jax.unlearn import vl_eraser as vle
from vleraser_jax.unlearn.adapter import lora_training_state, model_variables

F, D, RANK = 48, 24, 8
BLOCK = "llm/layers_0/mlp"


def subspace_keys(rng, basis, n):
    return (rng.standard_normal((n, basis.shape[1])) @ basis.T).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((F, F)))
    s_image, s_text, s_forget = q[:, :8], q[:, 8:24], q[:, 24:24 + RANK]
    kernel = (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32)
    params = {"llm": {"layers_0": {"mlp": {"down_proj": {"kernel": jnp.asarray(kernel)}}}}}
    keys = {"image": subspace_keys(rng, s_image, 200), "text": subspace_keys(rng, s_text, 400),
            "forget": subspace_keys(rng, s_forget, 512)}
    return params, kernel, keys


def projectors_from(retain: np.ndarray):
    stats = vacuum.RetainKeys("keys", {BLOCK: retain}, len(retain))
    projectors, report = vacuum.build_vacuum_projectors(stats, threshold=0.999, mode="energy")
    return projectors, report[0]


def unlearn(params, forget: np.ndarray, projectors, steps: int = 400):
    """Stage 1 (λ = 1: the distillation alone, as no language model is attached), calibrated deletion."""
    lora = lora_lib.init(params, RANK, 2.0 * RANK, jax.random.PRNGKey(0), b_std=1e-3)
    trainable, frozen = lora_training_state(params, lora, projectors)

    def loss_fn(frozen, trainable, batch, rng):
        student = model_variables(frozen, trainable, lora=True)["lora"]
        loss = vle.distill_loss({BLOCK: batch["h"]}, frozen["params"], student, frozen.get("vacuum"), batch["mask"])
        return loss, {}

    tx = tr.make_optimizer(tr.TrainConfig(total_steps=steps, learning_rate=1e-2, schedule="constant"))
    step = tr.make_train_step(loss_fn, tx)
    state = tr.init_state(trainable, tx, 0)
    batches = forget.reshape(8, 8, 8, F)  # 8 batches of [8 rows, 8 tokens, F]
    mask = np.ones((8, 8), np.int32)
    for i in range(steps):
        state, _ = step(state, frozen, {"h": batches[i % 8], "mask": mask})
    lora = tr.merge(state.trainable, frozen["lora_scales"])
    sums = vle.scale_sums_of_keys({BLOCK: forget[None]}, params, lora, projectors, np.ones((1, len(forget))))
    lora = vle.rescale(lora, vle.scales_from_sums([sums]))
    deleted = vle.delete(params, lora, projectors, strength=1.0)
    return np.asarray(deleted["llm"]["layers_0"]["mlp"]["down_proj"]["kernel"])


def relative_change(keys, before, after) -> float:
    return float(np.linalg.norm(keys @ (after - before)) / np.linalg.norm(keys @ before))


def test_text_aware_vacuum_deletes_the_forget_outputs_and_spares_the_retain_ones(world):
    params, kernel, keys = world
    projectors, report = projectors_from(np.concatenate([keys["image"], keys["text"]]))
    assert report.retained_rank == 24 == report.numerical_rank  # S_image ⊕ S_text, nothing more
    after = unlearn(params, keys["forget"], projectors)
    assert np.linalg.norm(keys["forget"] @ after) / np.linalg.norm(keys["forget"] @ kernel) < 0.05  # forgotten
    assert relative_change(keys["text"], kernel, after) < 1e-3
    assert relative_change(keys["image"], kernel, after) < 1e-3


def test_image_only_vacuum_does_not_protect_text_read_knowledge(world):
    params, kernel, keys = world
    projectors, report = projectors_from(keys["image"])
    assert report.retained_rank == 8
    after = unlearn(params, keys["forget"], projectors)
    assert np.linalg.norm(keys["forget"] @ after) / np.linalg.norm(keys["forget"] @ kernel) < 0.05  # forgotten too
    assert relative_change(keys["image"], kernel, after) < 1e-3  # what it protects, it protects
    assert relative_change(keys["text"], kernel, after) > 0.1  # the text-read outputs move
