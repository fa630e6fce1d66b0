"""The baselines' losses on the shared trainer (formulas in the package docstring)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ...processing import IGNORE_INDEX
from .. import trainer as tr
from ..adapter import Adapter
from .config import NPO_NLL, BaselineConfig


# ------------------------------------------------------------------ loss pieces


def kl_to_reference(ref_logits, logits, token_mask):
    """KL(p_ref ‖ p_θ) summed over vocab and the masked positions, divided by the batch size
    (torch's `F.kl_div(log_softmax(θ), softmax(ref), reduction="batchmean")`, restricted to `token_mask`)."""
    ref_logp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_position = (jnp.exp(ref_logp) * (ref_logp - logp)).sum(-1)
    return (per_position * token_mask.astype(jnp.float32)).sum() / logits.shape[0]


def kl_token_mask(batch, kl_tokens: str):
    """Positions whose next-token distribution the KL compares."""
    if kl_tokens == "attention":  # every real token (prompt, image and answer); padding excluded
        return batch["attention_mask"] != 0
    if kl_tokens == "answer":  # positions that predict an answer token
        valid = batch["labels"][:, 1:] != IGNORE_INDEX
        return jnp.pad(valid, ((0, 0), (0, 1)))
    return jnp.ones(batch["input_ids"].shape, bool)  # "all": the reference's every position, padding too


def npo_loss(nll, count, ref_nll, ref_count, beta: float, reduction: str = "batch_mean"):
    """−(2/β) log σ(β (NLL_θ − NLL_ref)). nll/count: per-sequence summed NLL and answer-token counts
    (`trainer.token_nll`). "batch_mean": NLL = Σ nll / Σ count over the batch (MLLMU-Bench's
    `outputs.loss`), one term per batch; "sequence": NLL = nll_i, the loss averaged over sequences.
    Returns (loss, mean log-ratio NLL_θ − NLL_ref)."""
    if reduction == "batch_mean":
        d = nll.sum() / jnp.maximum(count.sum(), 1.0) - ref_nll.sum() / jnp.maximum(ref_count.sum(), 1.0)
    elif reduction == "sequence":
        d = nll - ref_nll
    else:
        raise ValueError(f"reduction must be one of {NPO_NLL}, got {reduction!r}")
    return jnp.mean(-(2.0 / beta) * jax.nn.log_sigmoid(beta * d)), jnp.mean(d)




# ------------------------------------------------------------------ the losses


def baseline_loss_fn(adapter: Adapter, cfg: BaselineConfig) -> Callable:
    """`loss_fn(frozen, trainable, batch, rng)` for `cfg.method`; batch = {"forget"?: ..., "retain"?: ...}."""
    method = cfg.method

    def loss_fn(frozen, trainable, batch, rng):
        if not ("forget" in batch or "retain" in batch):
            raise ValueError("a baseline batch holds 'forget' and/or 'retain'")
        total = jnp.zeros((), jnp.float32)
        aux = {}
        if "forget" in batch:
            b = batch["forget"]
            logits = adapter.logits(frozen, trainable, b)
            nll, count = tr.token_nll(logits, b["labels"])
            mean_nll = nll.sum() / jnp.maximum(count.sum(), 1.0)
            aux["forget_nll"] = mean_nll
            if method == "npo":
                ref_nll, ref_count = tr.token_nll(adapter.reference_logits(frozen, b), b["labels"])
                term, log_ratio = npo_loss(nll, count, ref_nll, ref_count, cfg.beta, cfg.npo_nll)
                aux["npo_log_ratio"] = log_ratio
            else:
                term = -mean_nll
            total = total + cfg.forget_weight * term
        if "retain" in batch:
            if method == "ga":
                raise ValueError("GA has no retain term; schedule forget batches only")
            b = batch["retain"]
            logits = adapter.logits(frozen, trainable, b)
            retain_nll = tr.causal_lm_loss(logits, b["labels"])
            aux["retain_nll"] = retain_nll
            total = total + cfg.retain_weight * retain_nll
            if method == "kl":
                kl = kl_to_reference(adapter.vanilla_logits(frozen, b), logits, kl_token_mask(b, cfg.kl_tokens))
                aux["kl"] = kl
                total = total + cfg.kl_weight * kl
        return total, aux

    return loss_fn
