"""The JAX side of the benchmark: the package's own stage-1 and NPO steps, nothing re-implemented."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from vleraser_jax.unlearn import baselines as bl
from vleraser_jax.unlearn import lora as lora_lib
from vleraser_jax.unlearn import trainer as tr
from vleraser_jax.unlearn import vl_eraser as vle

from .models import Size, vle_projectors

LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, 0.01, 1.0
NPO_BETA = 0.4


def train_config(steps: int = 1000) -> tr.TrainConfig:
    # constant lr: one optimizer step means the same thing on both sides at any step
    return tr.TrainConfig(total_steps=steps, learning_rate=LR, schedule="constant", weight_decay=WEIGHT_DECAY,
                          max_grad_norm=MAX_GRAD_NORM, progress=False)


def vl_eraser(model, params, size: Size, lambda_: float = 0.5):
    """(step, state, frozen, lora tree, projectors) exactly as `vl_eraser.unlearn_vl_eraser` builds them."""
    cfg = vle.VLEraserConfig(rank=size.rank, lora_alpha=2.0 * size.rank, lambda_=lambda_, ce_mode="added",
                             distill_tokens="all")
    projectors = jax.tree_util.tree_map(jnp.asarray, vle_projectors(size))
    lora = lora_lib.init(params, cfg.rank, cfg.lora_alpha, jax.random.PRNGKey(0), b_std=cfg.lora_b_std)
    trainable, scales = lora_lib.split_trainable(lora)
    frozen = {"params": params, "lora_scales": scales, "vacuum": projectors}
    tx = tr.make_optimizer(train_config())
    step = tr.make_train_step(vle.distillation_loss_fn(model, cfg), tx)
    return step, tr.init_state(trainable, tx, 0), frozen, lora, projectors


def npo(model, params, size: Size):
    """(step, state, frozen, lora tree): NPO with LoRA on every LM linear, as `baselines.prepare` builds it."""
    # the LM's linears (the torch reference hooks LM blocks; MLLMU-Bench's CLIP q/k/v adapters add little work)
    cfg = bl.BaselineConfig(method="npo", lora_rank=size.rank, lora_alpha=float(size.rank), beta=NPO_BETA,
                            npo_nll="batch_mean", lora_pattern=lora_lib.LM_LINEARS)
    adapter, trainable, frozen = bl.prepare(model, params, cfg, jax.random.PRNGKey(0))
    tx = tr.make_optimizer(train_config())
    step = tr.make_train_step(bl.baseline_loss_fn(adapter, cfg), tx)
    lora = tr.merge(trainable, frozen["lora_scales"])
    return step, tr.init_state(trainable, tx, 0), frozen, lora


def trainable_by_module(state) -> dict:
    """{module path: {"a", "b"}} numpy, to compare with the torch side."""
    out: dict = {}
    for path, v in traverse_util.flatten_dict(jax.device_get(state.trainable)).items():
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = v
    return out
