"""VL-Eraser (DESIGN §4): vacuum distillation into a LoRA on the FFN output matrices, then arithmetic deletion.

Distillation (the paper's stage 1) trains only the LoRA, only on the forget set:
    L = λ · L_distill + (1 − λ) · L_CE
    L_distill = mean over blocks l of mean over forget tokens s of 1 − cos(W_down h_s, B A P h_s)
    L_CE      = next-token cross-entropy on forget answers, with the LoRA in the forward pass
                ("added": W_down h + ΔW h; "replaced": ΔW h alone)
Deletion (stage 2) is arithmetic: W_down ← W_down − strength · scale · (B A P)ᵀ (`delete`).

Ablations are config switches: vacuum=False (P = I), lambda_=0 (no distillation), lambda_=1 (no CE).
`unlearn_vl_eraser` runs the whole method on a model: retain statistics -> vacuum projectors -> distillation ->
deletion.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util
from PIL import Image

from ..data import mllmu
from ..data.batching import BatchSchedule, qa_example, tokenize
from ..models.layers import LORA_MODES, lora_delta
from . import lora as lora_lib
from . import trainer as tr
from . import vacuum
from .adapter import lora_training_state, model_inputs, model_variables

DISTILL_TOKENS = ("all", "answer")


@dataclasses.dataclass(frozen=True)
class VLEraserConfig:
    rank: int = 8
    lora_alpha: float = 16.0  # the LoRA's scale is lora_alpha / rank
    lambda_: float = 0.5
    ce_mode: str = "added"
    vacuum: bool = True
    pooling: str = "mean"  # vacuum statistics: per-image mean keys or every image token
    threshold: float = 2e-2
    threshold_mode: str = "absolute"  # "absolute" (AlphaEdit's 2e-2), "relative" (× top eigenvalue), "rank"
    retained_rank: int | None = None  # for threshold_mode="rank"
    layers: tuple[int, ...] | None = None  # LM blocks to adapt (None: all)
    deletion_strength: float = 1.0  # W_down ← W_down − strength · ΔW
    distill_tokens: str = "all"  # forget tokens the distillation averages over: every real token, or answers
    lora_b_std: float = 1e-3  # cosine needs a non-zero student at step 0

    def __post_init__(self):
        if self.ce_mode not in LORA_MODES:
            raise ValueError(f"ce_mode must be one of {LORA_MODES}, got {self.ce_mode!r}")
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {self.lambda_}")
        if self.distill_tokens not in DISTILL_TOKENS:
            raise ValueError(f"distill_tokens must be one of {DISTILL_TOKENS}, got {self.distill_tokens!r}")


def cosine_distance(teacher, student, eps: float = 1e-8):
    """1 − cos along the last axis, in f32."""
    t, s = teacher.astype(jnp.float32), student.astype(jnp.float32)
    cos = (t * s).sum(-1) / (jnp.linalg.norm(t, axis=-1) * jnp.linalg.norm(s, axis=-1) + eps)
    return 1.0 - cos


def distill_loss(keys: dict, params, lora, vacuum_projectors, token_mask):
    """Mean over blocks of the token-mean cosine distance between W_down h and B A P h.

    keys: {block path ("llm/layers_i/mlp"): h [B, T, F]}; token_mask [B, T] (1 = a forget token that
    counts). The keys are treated as inputs (no gradient flows into earlier blocks through them).
    """
    flat_params = traverse_util.flatten_dict(params)
    lora_entries = lora_lib.entries(lora)
    vacuum_entries = lora_lib.entries(vacuum_projectors) if vacuum_projectors is not None else {}
    mask = token_mask.astype(jnp.float32)
    losses = []
    for block, h in sorted(keys.items()):
        module = f"{block}/down_proj"
        if module not in lora_entries:
            continue
        h = jax.lax.stop_gradient(h.astype(jnp.float32))
        teacher = h @ flat_params[tuple(module.split("/")) + ("kernel",)].astype(jnp.float32)
        student = lora_delta(h, lora_entries[module], vacuum_entries.get(module))
        per_token = cosine_distance(teacher, student)
        losses.append((per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0))
    if not losses:
        raise ValueError("no LoRA entry sits on a captured FFN (expected .../mlp/down_proj)")
    return jnp.mean(jnp.stack(losses))


def _keys_from(state) -> dict:
    flat = traverse_util.flatten_dict(state["intermediates"])
    return {"/".join(path[:-1]): value[0] for path, value in flat.items() if path[-1] == "ffn_key"}


def distillation_loss_fn(model, cfg: VLEraserConfig):
    """loss_fn(frozen, trainable, batch, rng) for the shared trainer.

    frozen = {"params", "lora_scales" (the LoRA's fixed α/r), optionally "vacuum" (vacuum projectors)};
    trainable = the LoRA's a/b matrices. Batches carry input_ids, attention_mask, labels (+ image inputs).
    """

    def loss_fn(frozen, trainable, batch, rng):
        variables = model_variables(frozen, trainable, lora=True)
        out, state = model.apply(variables, **model_inputs(batch), lora_mode=cfg.ce_mode, mutable=["intermediates"])
        ce = tr.causal_lm_loss(out.logits, batch["labels"])
        if cfg.distill_tokens == "answer":
            token_mask = batch["labels"] != tr.IGNORE_INDEX
        else:
            token_mask = batch["attention_mask"]
        distill = distill_loss(_keys_from(state), frozen["params"], variables["lora"], frozen.get("vacuum"), token_mask)
        total = cfg.lambda_ * distill + (1.0 - cfg.lambda_) * ce
        return total, {"distill": distill, "ce": ce}

    return loss_fn


def delete(params, lora, vacuum_projectors=None, strength: float = 1.0, sharding=None):
    """Stage 2, a pure function: W_down ← W_down − strength · scale · (B A P)ᵀ in the stored [F, D] layout.

    sharding: a `parallel.Sharder`; the deletion then runs as one jit with explicit shardings, the result
    laid out like the parameters (inputs are not donated: they stay valid).
    """
    if sharding is None:
        return lora_lib.merge(params, lora, vacuum_projectors, sign=-strength)
    fn = sharding.jit(
        lambda p, l, pr: lora_lib.merge(p, l, pr, sign=-strength),
        lambda p, l, pr: (sharding.tree(p), sharding.tree(l), sharding.tree(pr)),
        lambda p, l, pr: sharding.tree(p),
    )
    return fn(params, lora, vacuum_projectors)


# ------------------------------------------------------------------ the method on a model


def retain_image_batches(processor, rows: Sequence[mllmu.TrainingRow], batch_size: int = 32) -> list[dict]:
    """One image-grounded prompt per retain person (its first image row): the vacuum statistics' inputs."""
    first: dict[str, mllmu.TrainingRow] = {}
    for row in rows:
        if row.image is not None and row.person_id not in first:
            first[row.person_id] = row
    chosen = [first[k] for k in sorted(first)]
    if not chosen:
        raise ValueError("the retain set has no image-grounded rows to build the vacuum projector from")
    batches = []
    for start in range(0, len(chosen), batch_size):
        part = chosen[start : start + batch_size]
        texts = [processor.build_prompt(r.question, with_image=True) for r in part]
        images = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in part]
        batches.append(processor(texts, images=images, padding_side="right"))
    return batches


def vacuum_projectors_for(model, params, processor, retain_rows, cfg: VLEraserConfig, *, sharding=None,
                          log=print) -> tuple[dict, dict]:
    """The vacuum projectors of the retain set's image keys, restricted to `cfg.layers`; returns (tree, info)."""
    t0 = time.perf_counter()
    batches = retain_image_batches(processor, retain_rows)
    moments, n = vacuum.collect_moments(model, params, batches, cfg.pooling, sharding=sharding)
    projectors, report = vacuum.build_vacuum_projectors(moments, cfg.threshold, cfg.threshold_mode, cfg.retained_rank)
    if cfg.layers is not None:
        keep = {f"layers_{i}" for i in cfg.layers}
        projectors = {"llm": {k: v for k, v in projectors.get("llm", {}).items() if k in keep}}
    info = {"vacuum_seconds": time.perf_counter() - t0, "vacuum_vectors": n,
            "vacuum_report": [dataclasses.asdict(r) for r in report]}
    images = sum(len(b["input_ids"]) for b in batches)
    what = f"{images} retain images (one mean key each)" if cfg.pooling == "mean" else \
        f"{n} image-token keys of {images} retain images"
    log(f"vacuum projector from {what} in {info['vacuum_seconds']:.1f} s\n" + vacuum.format_report(report))
    if all(r.stored == "identity" for r in report):
        log(f"warning: no retain direction passes the {cfg.threshold_mode} threshold {cfg.threshold}: the vacuum "
            "projector is the identity (as with vacuum=False); lower the threshold or use threshold_mode='rank'")
    return projectors, info


def unlearn_vl_eraser(model, params, processor, forget_rows: Sequence[mllmu.TrainingRow],
                      retain_rows: Sequence[mllmu.TrainingRow], cfg: VLEraserConfig, run: tr.RunSettings, *,
                      sharding=None, log=print, log_path=None,
                      tensorboard_dir=None) -> tuple[Any, dict, dict | None, dict]:
    """VL-Eraser: vacuum projectors from `retain_rows`' images, distillation on `forget_rows`, deletion.

    Returns (unlearned params, the trained LoRA, the vacuum projectors or None, info with timings and history;
    info["lora_merge_weight"] = −strength: the unlearned model is the params plus that weight times the LoRA).
    sharding: a `parallel.Sharder`: retain statistics, distillation and the deletion run sharded over its mesh.
    log_path / tensorboard_dir: the distillation's metric log (`TrainConfig`).
    """
    info: dict[str, Any] = {"config": dataclasses.asdict(cfg), "run": dataclasses.asdict(run),
                            "lora_merge_weight": -float(cfg.deletion_strength)}
    projectors = None
    if cfg.vacuum:
        projectors, vacuum_info = vacuum_projectors_for(model, params, processor, retain_rows, cfg,
                                                        sharding=sharding, log=log)
        info.update(vacuum_info)
    rows = list(forget_rows)
    if not rows:
        raise ValueError("the forget set has no training rows")
    data = tokenize(processor, [qa_example(processor, r) for r in rows], run.max_length)
    schedule = BatchSchedule([(data, 1.0)], run.batch_size, run.steps, run.seed)
    lora = lora_lib.init(params, cfg.rank, cfg.lora_alpha, jax.random.PRNGKey(run.seed), layers=cfg.layers,
                         b_std=cfg.lora_b_std)
    trainable, frozen = lora_training_state(params, lora, projectors)
    train_cfg = tr.TrainConfig(total_steps=run.steps, learning_rate=run.learning_rate, warmup_steps=run.warmup_steps,
                               seed=run.seed, log_every=max(run.steps // 20, 1), description="VL-Eraser distillation",
                               log_path=log_path, tensorboard_dir=tensorboard_dir)
    result = tr.train(distillation_loss_fn(model, cfg), trainable, frozen, schedule, train_cfg, sharding=sharding)
    info["distill_seconds"] = result.seconds
    info["distill_history"] = result.history
    lora = tr.merge(result.trainable, frozen["lora_scales"])
    t0 = time.perf_counter()
    unlearned = delete(params, lora, projectors, cfg.deletion_strength, sharding=sharding)
    jax.block_until_ready(unlearned)
    info["delete_seconds"] = time.perf_counter() - t0
    log(f"distillation: {run.steps} steps in {result.seconds:.1f} s (distill {result.history[-1]['distill']:.3f}, "
        f"ce {result.history[-1]['ce']:.3f}); deletion in {info['delete_seconds'] * 1e3:.1f} ms")
    return unlearned, lora, projectors, info
