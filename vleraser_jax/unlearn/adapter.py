"""How a (frozen, trainable) pair of trees becomes a forward pass: the one place that assembles the model's
variables for every stage and method.

LoRA mode: trainable = the LoRA's a/b matrices; frozen = {"params": every model parameter, "lora_scales": the
LoRA's fixed α/r, optionally "vacuum": vacuum projectors the LoRA's input goes through}.
Full mode: trainable = a parameter subtree; frozen = {"params": the rest, optionally "vanilla": the trainable
subtree's original values, for losses that compare with the model before training (KL, NPO)}.
Either mode may carry frozen["ref"], a complete parameter tree for NPO's reference model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import lora as lora_lib
from .trainer import causal_lm_loss, merge, partition, token_nll

LOSSES = ("token", "example")


def model_variables(frozen: dict, trainable: dict, lora: bool) -> dict:
    """The variables `model.apply` takes for this (frozen, trainable) pair."""
    if not lora:
        return {"params": merge(trainable, frozen["params"])}
    variables = {"params": frozen["params"], "lora": merge(trainable, frozen["lora_scales"])}
    if frozen.get("vacuum") is not None:
        variables["vacuum"] = frozen["vacuum"]
    return variables


def lora_training_state(params, lora, vacuum_projectors=None) -> tuple[dict, dict]:
    """(trainable, frozen) to train `lora` on top of `params` (optionally behind vacuum projectors)."""
    trainable, scales = lora_lib.split_trainable(lora)
    frozen = {"params": params, "lora_scales": scales}
    if vacuum_projectors is not None:
        frozen["vacuum"] = vacuum_projectors
    return trainable, frozen


def full_training_state(params, trainable_regex: str) -> tuple[dict, dict]:
    """(trainable, frozen) to train the parameters whose path matches `trainable_regex` directly; what trains is
    held in f32 (its master copy) whatever the dtype the rest is held in."""
    trainable, rest = partition(params, trainable_regex)
    trainable = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), trainable)
    return trainable, {"params": rest}


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "position_ids")


def model_inputs(batch: dict) -> dict:
    """A batch's model keyword arguments (labels and any per-token masks a method carries stay out)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


class Adapter:
    """Forward passes of one model through (frozen, trainable) trees (see the module docstring)."""

    def __init__(self, model, lora: bool):
        self.model = model
        self.lora = lora

    def _apply(self, variables, inputs):
        return self.model.apply(variables, **model_inputs(inputs)).logits

    def logits(self, frozen, trainable, inputs):
        return self._apply(model_variables(frozen, trainable, self.lora), inputs)

    def vanilla_params(self, frozen):
        return frozen["params"] if self.lora else merge(frozen["vanilla"], frozen["params"])

    def vanilla_logits(self, frozen, inputs):
        return jax.lax.stop_gradient(self._apply({"params": self.vanilla_params(frozen)}, inputs))

    def reference_logits(self, frozen, inputs):
        params = frozen["ref"] if frozen.get("ref") is not None else self.vanilla_params(frozen)
        return jax.lax.stop_gradient(self._apply({"params": params}, inputs))

    def unlearned_params(self, frozen, trainable):
        """The plain parameter tree after training: LoRA merged into the kernels, or the trained subtree."""
        if self.lora:
            return lora_lib.merge(frozen["params"], merge(trainable, frozen["lora_scales"]))
        return merge(trainable, frozen["params"])


def lm_loss_fn(model, loss: str = "token", lora: bool = False):
    """Next-token loss on answer tokens: mean over tokens ("token") or mean of each row's mean ("example"),
    through an `Adapter` (lora: the trainable tree is a LoRA)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    adapter = Adapter(model, lora)

    def loss_fn(frozen, trainable, batch, rng):
        logits = adapter.logits(frozen, trainable, batch)
        if loss == "token":
            return causal_lm_loss(logits, batch["labels"]), {}
        nll, count = token_nll(logits, batch["labels"])
        return jnp.mean(nll / jnp.maximum(count, 1.0)), {}

    return loss_fn
