"""VL-Eraser (DESIGN §4): vacuum distillation into a LoRA on the FFN output matrices, then deletion.

Stage 1 trains only the LoRA, only on the forget set:
    L = λ · L_distill + (1 − λ) · L_CE
    L_distill = mean over blocks l of mean over forget tokens s of 1 − cos(W_down h_s, B A P h_s)
    L_CE      = next-token cross-entropy on forget answers, with the LoRA in the forward pass
                ("added": W_down h + ΔW h; "replaced": ΔW h alone)
Stage 2 is arithmetic: W_down ← W_down − α · scale · (B A P)ᵀ (`delete`).

Ablations are config switches: vacuum=False (P = I), lambda_=0 (no distillation), lambda_=1 (no CE).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from ..models.layers import lora_delta
from . import lora as lora_lib
from .trainer import causal_lm_loss

CE_MODES = ("added", "replaced")
DISTILL_TOKENS = ("all", "answer")


@dataclasses.dataclass(frozen=True)
class VLEraserConfig:
    rank: int = 8
    alpha: float = 16.0
    lambda_: float = 0.5
    ce_mode: str = "added"
    vacuum: bool = True
    pooling: str = "mean"  # projector statistics: per-image mean keys or every image token
    threshold: float = 2e-2
    threshold_mode: str = "absolute"  # "absolute" (AlphaEdit's 2e-2), "relative" (× top eigenvalue), "rank"
    retained_rank: int | None = None  # for threshold_mode="rank"
    layers: tuple[int, ...] | None = None  # LM blocks to adapt (None: all)
    delete_alpha: float = 1.0
    distill_tokens: str = "all"  # forget tokens the distillation averages over: every real token, or answers
    lora_b_std: float = 1e-3  # cosine needs a non-zero student at step 0

    def __post_init__(self):
        if self.ce_mode not in CE_MODES:
            raise ValueError(f"ce_mode must be one of {CE_MODES}, got {self.ce_mode!r}")
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {self.lambda_}")
        if self.distill_tokens not in DISTILL_TOKENS:
            raise ValueError(f"distill_tokens must be one of {DISTILL_TOKENS}, got {self.distill_tokens!r}")


def cosine_distance(teacher, student, eps: float = 1e-8):
    """1 − cos along the last axis, in f32."""
    t, s = teacher.astype(jnp.float32), student.astype(jnp.float32)
    cos = (t * s).sum(-1) / (jnp.linalg.norm(t, axis=-1) * jnp.linalg.norm(s, axis=-1) + eps)
    return 1.0 - cos


def distill_loss(keys: dict, params, lora, projectors, token_mask):
    """Mean over blocks of the token-mean cosine distance between W_down h and B A P h.

    keys: {block path ("llm/layers_i/mlp"): h [B, T, F]}; token_mask [B, T] (1 = a forget token that
    counts). The keys are treated as inputs (no gradient flows into earlier blocks through them).
    """
    flat_params = traverse_util.flatten_dict(params)
    lora_entries = lora_lib.entries(lora)
    proj_entries = lora_lib.entries(projectors) if projectors is not None else {}
    mask = token_mask.astype(jnp.float32)
    losses = []
    for block, h in sorted(keys.items()):
        module = f"{block}/down_proj"
        if module not in lora_entries:
            continue
        h = jax.lax.stop_gradient(h.astype(jnp.float32))
        teacher = h @ flat_params[tuple(module.split("/")) + ("kernel",)].astype(jnp.float32)
        student = lora_delta(h, lora_entries[module], proj_entries.get(module))
        per_token = cosine_distance(teacher, student)
        losses.append((per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0))
    if not losses:
        raise ValueError("no LoRA entry sits on a captured FFN (expected .../mlp/down_proj)")
    return jnp.mean(jnp.stack(losses))


def _keys_from(state) -> dict:
    flat = traverse_util.flatten_dict(state["intermediates"])
    return {"/".join(path[:-1]): value[0] for path, value in flat.items() if path[-1] == "ffn_key"}


def stage1_loss_fn(model, cfg: VLEraserConfig):
    """loss_fn(frozen, trainable, batch, rng) for the shared trainer.

    frozen = {"params", "scales" (the LoRA's fixed α/r), "vacuum" (projectors or None)};
    trainable = the LoRA's a/b matrices. Batches carry input_ids, attention_mask, labels (+ image inputs).
    """

    def loss_fn(frozen, trainable, batch, rng):
        lora = traverse_util.unflatten_dict(
            {**traverse_util.flatten_dict(trainable), **traverse_util.flatten_dict(frozen["scales"])}
        )
        variables: dict[str, Any] = {"params": frozen["params"], "lora": lora}
        if frozen["vacuum"] is not None:
            variables["vacuum"] = frozen["vacuum"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out, state = model.apply(variables, **inputs, lora_mode=cfg.ce_mode, mutable=["intermediates"])
        ce = causal_lm_loss(out.logits, batch["labels"])
        if cfg.distill_tokens == "answer":
            token_mask = batch["labels"] != -100
        else:
            token_mask = batch["attention_mask"]
        distill = distill_loss(_keys_from(state), frozen["params"], lora, frozen["vacuum"], token_mask)
        total = cfg.lambda_ * distill + (1.0 - cfg.lambda_) * ce
        return total, {"distill": distill, "ce": ce}

    return loss_fn


def delete(params, lora, projectors=None, alpha: float = 1.0, sharding=None):
    """Stage 2, a pure function: W_down ← W_down − α · scale · (B A P)ᵀ in the stored [F, D] layout.

    sharding: a `parallel.Sharder`; the deletion then runs as one jit with explicit shardings, the result
    laid out like the parameters (inputs are not donated: they stay valid).
    """
    if sharding is None:
        return lora_lib.merge(params, lora, projectors, sign=-alpha)
    fn = sharding.jit(
        lambda p, l, pr: lora_lib.merge(p, l, pr, sign=-alpha),
        lambda p, l, pr: (sharding.tree(p), sharding.tree(l), sharding.tree(pr)),
        lambda p, l, pr: sharding.tree(p),
    )
    return fn(params, lora, projectors)
