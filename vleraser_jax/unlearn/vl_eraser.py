"""VL-Eraser (DESIGN §4): vacuum distillation into a LoRA on the FFN output matrices, then arithmetic deletion.

Distillation (the paper's stage 1) trains only the LoRA, only on the forget set:
    L = λ · L_distill + (1 − λ) · L_CE
    L_distill = mean over blocks l of mean over distilled tokens s of 1 − cos(W_down h_s, B A P h_s)
    L_CE      = next-token cross-entropy on forget answers, with the LoRA in the forward pass
                ("added": W_down h + ΔW h; "replaced": ΔW h alone)
The teacher is the frozen FFN: keys h and W_down h come from a LoRA-free forward pass. The distilled tokens
are every real token, the answer tokens, or the entity tokens (the person's name wherever it appears, and the
answer). Deletion (stage 2) is arithmetic: W_down ← W_down − α · c_l · (B A P)ᵀ, where c_l is the closed-form
least-squares scale of the student onto the teacher over forget answer tokens (`deletion_scale="calibrated"`,
so α = 1 removes the distilled component; "raw": c_l = 1, the cosine's arbitrary magnitude).

Ablations are config switches: vacuum=False (P = I), lambda_=0 (no distillation), lambda_=1 (no CE).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from ..data import mllmu
from ..data.batching import BatchSchedule, epoch_batches, indexed_batches, qa_example, rows_by_group, tokenize

from ..models.layers import LORA_MODES, lora_delta
from . import lora as lora_lib
from . import trainer as tr
from . import vacuum
from .adapter import lora_training_state, model_inputs, model_variables

DISTILL_TOKENS = ("all", "answer", "entity")
VACUUM_SOURCES = ("image", "image+text")
DELETION_SCALES = ("calibrated", "raw")
ENTITY_MASK = "entity_mask"  # [B, T] 1 = a token of the row's person's name


@dataclasses.dataclass(frozen=True)
class VLEraserConfig:
    rank: int = 8
    lora_alpha: float = 16.0  # the LoRA's scale is lora_alpha / rank
    lambda_: float = 0.5
    ce_mode: str = "added"
    vacuum: bool = True
    vacuum_source: str = "image+text"  # "image": retain image tokens (the paper); "image+text": every retain position
    pooling: str = "tokens"  # vacuum statistics: every marked key, or each row's mean ("mean", the paper's pooling)
    threshold: float = 0.99
    threshold_mode: str = "energy"  # energy fraction | relative (× top eigenvalue) | absolute | rank
    retained_rank: int | None = None  # for threshold_mode="rank"
    decomposition: str = "svd"  # or "eigh" (of the f32 second moment)
    layers: tuple[int, ...] | None = None  # LM blocks to adapt (None: all)
    deletion_strength: float = 1.0  # α: W_down ← W_down − α · c_l · ΔW
    deletion_scale: str = "calibrated"  # c_l: least squares on forget answer tokens, or "raw" (c_l = 1)
    distill_tokens: str = "entity"  # forget tokens the distillation averages over
    lora_b_std: float = 1e-3  # cosine needs a non-zero student at step 0

    def __post_init__(self):
        choices = {"ce_mode": LORA_MODES, "distill_tokens": DISTILL_TOKENS, "vacuum_source": VACUUM_SOURCES,
                   "deletion_scale": DELETION_SCALES, "pooling": vacuum.POOLINGS,
                   "threshold_mode": vacuum.THRESHOLD_MODES, "decomposition": vacuum.DECOMPOSITIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {self.lambda_}")


def cosine_distance(teacher, student, eps: float = 1e-8):
    """1 − cos along the last axis, in f32."""
    t, s = teacher.astype(jnp.float32), student.astype(jnp.float32)
    cos = (t * s).sum(-1) / (jnp.linalg.norm(t, axis=-1) * jnp.linalg.norm(s, axis=-1) + eps)
    return 1.0 - cos


def _distilled_pairs(keys: dict, params, lora, vacuum_projectors):
    """[(block, teacher W_down h, student B A P h)] for every block whose down_proj carries a LoRA entry."""
    flat_params = traverse_util.flatten_dict(params)
    lora_entries = lora_lib.entries(lora)
    vacuum_entries = lora_lib.entries(vacuum_projectors) if vacuum_projectors is not None else {}
    pairs = []
    for block, h in sorted(keys.items()):
        module = f"{block}/down_proj"
        if module not in lora_entries:
            continue
        h = jax.lax.stop_gradient(h)
        # accumulated in f32 from the operands' own dtypes: for bf16 keys and weights the same numbers as an f32
        # matmul (bf16 × bf16 products are exact in f32) without an f32 copy of every W_down
        kernel = flat_params[tuple(module.split("/")) + ("kernel",)]
        teacher = jnp.einsum("...f,fd->...d", h, kernel, preferred_element_type=jnp.float32)
        # the student in f32: P h = h − U Uᵀ h cancels most of h, which bf16 would leave as leakage
        pairs.append((block, teacher, lora_delta(h.astype(jnp.float32), lora_entries[module],
                                                 vacuum_entries.get(module))))
    if not pairs:
        raise ValueError("no LoRA entry sits on a captured FFN (expected .../mlp/down_proj)")
    return pairs


def distill_loss(keys: dict, params, lora, vacuum_projectors, token_mask):
    """Mean over blocks of the token-mean cosine distance between W_down h and B A P h.

    keys: {block path ("llm/layers_i/mlp"): h [B, T, F]}; token_mask [B, T] (1 = a forget token that
    counts). The keys are treated as inputs (no gradient flows into earlier blocks through them).
    """
    mask = token_mask.astype(jnp.float32)
    losses = [(cosine_distance(t, s) * mask).sum() / jnp.maximum(mask.sum(), 1.0)
              for _, t, s in _distilled_pairs(keys, params, lora, vacuum_projectors)]
    return jnp.mean(jnp.stack(losses))


def keys_from(state) -> dict:
    """{block path: FFN keys h} from a forward pass's "intermediates"."""
    flat = traverse_util.flatten_dict(state["intermediates"])
    return {"/".join(path[:-1]): value[0] for path, value in flat.items() if path[-1] == "ffn_key"}


def teacher_keys(model, params, batch) -> dict:
    """The frozen model's FFN keys (a LoRA-free forward pass), without gradient."""
    _, state = model.apply({"params": params}, **model_inputs(batch), mutable=["intermediates"])
    return jax.tree_util.tree_map(jax.lax.stop_gradient, keys_from(state))


def answer_mask(batch):
    return batch["labels"] != tr.IGNORE_INDEX


def distill_mask(batch, distill_tokens: str):
    """[B, T] the tokens the distillation averages over."""
    if distill_tokens == "all":
        return batch["attention_mask"].astype(bool)
    if distill_tokens == "answer":
        return answer_mask(batch)
    if ENTITY_MASK not in batch:
        raise ValueError("distill_tokens='entity' needs batches with an 'entity_mask' (see entity_token_mask)")
    return answer_mask(batch) | batch[ENTITY_MASK].astype(bool)


def distillation_loss_fn(model, cfg: VLEraserConfig):
    """loss_fn(frozen, trainable, batch, rng) for the shared trainer.

    frozen = {"params", "lora_scales" (the LoRA's fixed α/r), optionally "vacuum" (vacuum projectors)};
    trainable = the LoRA's a/b matrices. Batches carry input_ids, attention_mask, labels (+ image inputs, and
    an entity_mask for distill_tokens="entity").
    """

    def loss_fn(frozen, trainable, batch, rng):
        variables = model_variables(frozen, trainable, lora=True)
        zero = jnp.zeros((), jnp.float32)
        ce = distill = zero
        if cfg.lambda_ < 1.0:
            logits = model.apply(variables, **model_inputs(batch), lora_mode=cfg.ce_mode).logits
            ce = tr.causal_lm_loss(logits, batch["labels"])
        if cfg.lambda_ > 0.0:
            distill = distill_loss(teacher_keys(model, frozen["params"], batch), frozen["params"], variables["lora"],
                                   frozen.get("vacuum"), distill_mask(batch, cfg.distill_tokens))
        total = cfg.lambda_ * distill + (1.0 - cfg.lambda_) * ce
        return total, {"distill": distill, "ce": ce}

    return loss_fn


# ------------------------------------------------------------------ the deletion's scale


def scale_sums_of_keys(keys: dict, params, lora, vacuum_projectors, token_mask) -> dict:
    """{block: (Σ <teacher, student>, Σ |student|²)} over the masked tokens of these teacher keys."""
    mask = token_mask.astype(jnp.float32)[..., None]
    return {block: ((t * s * mask).sum(), (s * s * mask).sum())
            for block, t, s in _distilled_pairs(keys, params, lora, vacuum_projectors)}


@functools.partial(jax.jit, static_argnames=("model",))
def _scale_sums(model, params, lora, vacuum_projectors, batch):
    return scale_sums_of_keys(teacher_keys(model, params, batch), params, lora, vacuum_projectors, answer_mask(batch))


def scales_from_sums(sums: Iterable[dict]) -> dict[str, float]:
    """{module path: c_l = Σ <t, s> / Σ |s|²} from per-batch `scale_sums_of_keys` results."""
    dots: dict[str, float] = {}
    norms: dict[str, float] = {}
    for part in sums:
        for block, (d, n) in jax.device_get(part).items():
            dots[block] = dots.get(block, 0.0) + float(d)
            norms[block] = norms.get(block, 0.0) + float(n)
    return {f"{block}/down_proj": (dots[block] / norms[block] if norms[block] > 0 else 0.0) for block in dots}


def least_squares_scales(model, params, lora, vacuum_projectors, batches) -> dict[str, float]:
    """{module path: c_l = argmin_c Σ_s |W_down h_s − c · B A P h_s|²} over the batches' answer tokens (the
    frozen teacher's keys): α = 1 then subtracts exactly the part of W_down h the student reproduces."""
    return scales_from_sums(_scale_sums(model, params, lora, vacuum_projectors, b) for b in batches)


def rescale(lora, scales: dict[str, float]):
    """The LoRA with each module's B multiplied by its scale (so `delete` and PEFT exports carry it)."""
    flat = dict(traverse_util.flatten_dict(lora))
    for module, c in scales.items():
        key = tuple(module.split("/")) + ("b",)
        flat[key] = flat[key] * jnp.asarray(c, flat[key].dtype)
    return traverse_util.unflatten_dict(flat)


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


# ------------------------------------------------------------------ entity tokens


def name_token_ids(processor, name: str) -> list[list[int]]:
    """The token sequences a person's name can take in running text (with and without a leading space)."""
    tok = processor.tokenizer
    seqs = {tuple(tok(variant, add_special_tokens=False)["input_ids"]) for variant in (" " + name, name)}
    return [list(s) for s in seqs if s]


def entity_token_mask(input_ids: np.ndarray, names: list[list[list[int]]]) -> np.ndarray:
    """[N, L] 1 where row i's tokens spell one of `names[i]`'s token sequences."""
    out = np.zeros(input_ids.shape, np.int32)
    for i, seqs in enumerate(names):
        row = input_ids[i]
        for seq in seqs:
            m = len(seq)
            if m == 0 or m > len(row):
                continue
            windows = np.lib.stride_tricks.sliding_window_view(row, m)
            for start in np.flatnonzero((windows == np.asarray(seq)).all(1)):
                out[i, start: start + m] = 1
    return out


# ------------------------------------------------------------------ the method on a model


def retain_image_batches(processor, rows: Sequence[mllmu.TrainingRow], batch_size: int = 32) -> list[dict]:
    """One image-grounded prompt per retain person (its first image row); its image tokens are the positions
    (the paper's retain image representations)."""
    first: dict[str, mllmu.TrainingRow] = {}
    for row in rows:
        if row.image is not None and row.person_id not in first:
            first[row.person_id] = row
    chosen = [first[k] for k in sorted(first)]
    if not chosen:
        raise ValueError("the retain set has no image-grounded rows to build the vacuum projector from")
    batches = []
    for start in range(0, len(chosen), batch_size):
        part = chosen[start: start + batch_size]
        texts = [processor.build_prompt(r.question, with_image=True) for r in part]
        images = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in part]
        batches.append(processor(texts, images=images, padding_side="right"))
    return batches


def retain_text_batches(processor, rows: Sequence[mllmu.TrainingRow], max_length: int, batch_size: int = 32
                        ) -> list[dict]:
    """Every retain QA row (image-grounded and text-only) with its answer; every real position counts."""
    if not rows:
        raise ValueError("the retain set has no rows to build the vacuum projector from")
    data = tokenize(processor, [qa_example(processor, r) for r in rows], max_length)
    return vacuum_masked_batches(data, data.attention_mask, batch_size)


def vacuum_masked_batches(data, mask: np.ndarray, batch_size: int = 32) -> list[dict]:
    """`data` in batches whose `vacuum.MASK_KEY` is `mask` [N, L]; the filler copies of a short last batch do not
    count twice."""
    data.token_masks[vacuum.MASK_KEY] = np.asarray(mask, np.int32)
    batches = []
    for part, batch in indexed_batches(data, batch_size, rows_by_group(data)):
        batch[vacuum.MASK_KEY] = batch[vacuum.MASK_KEY].copy()
        batch[vacuum.MASK_KEY][len(part):] = 0
        batches.append(batch)
    return batches


def rows_entity_mask(processor, input_ids: np.ndarray, rows, names: dict[str, str]) -> np.ndarray:
    """[N, L] 1 at each row's person's name tokens (`names`: person id → name; a person without one: none)."""
    tokens = {pid: name_token_ids(processor, name) for pid, name in names.items()}
    return entity_token_mask(input_ids, [tokens.get(r.person_id, []) for r in rows])


def vacuum_projectors_for(model, params, processor, retain_rows, cfg: VLEraserConfig, *, max_length: int = 128,
                          sharding=None, log=print) -> tuple[dict, dict]:
    """The vacuum projectors of the retain set's keys (`cfg.vacuum_source`), restricted to `cfg.layers`;
    returns (tree, info)."""
    t0 = time.perf_counter()
    if cfg.vacuum_source == "image":
        batches = retain_image_batches(processor, retain_rows)
        what = f"image tokens of {sum(len(b['input_ids']) for b in batches)} retain images"
    else:
        batches = retain_text_batches(processor, retain_rows, max_length)
        what = f"every real position of {len(retain_rows)} retain rows (prompts and answers)"
    keys = vacuum.collect_keys(model, params, batches, cfg.pooling, sharding=sharding, what="retain keys")
    projectors, report = vacuum.build_vacuum_projectors(keys, cfg.threshold, cfg.threshold_mode, cfg.retained_rank,
                                                        decomposition=cfg.decomposition)
    if cfg.layers is not None:
        keep = {f"layers_{i}" for i in cfg.layers}
        projectors = {"llm": {k: v for k, v in projectors.get("llm", {}).items() if k in keep}}
    info = {"vacuum_seconds": time.perf_counter() - t0, "vacuum_vectors": keys.count,
            "vacuum_statistics": keys.kind, "vacuum_report": [dataclasses.asdict(r) for r in report]}
    how = "one mean key per row" if cfg.pooling == "mean" else f"{keys.count} keys"
    log(f"vacuum projector from the {what} ({how}; {cfg.decomposition} of the "
        f"{'stacked keys' if keys.kind == 'keys' else 'second moment'}) in {info['vacuum_seconds']:.1f} s\n"
        + vacuum.format_report(report))
    if all(r.stored == "identity" for r in report):
        log(f"warning: no retain direction passes the {cfg.threshold_mode} threshold {cfg.threshold}: the vacuum "
            "projector is the identity (as with vacuum=False)")
    return projectors, info


def forget_data(processor, rows, cfg: VLEraserConfig, max_length: int, entity_names: dict[str, str] | None):
    """The forget rows tokenised, with the entity mask when the distillation needs it; (data, info)."""
    data = tokenize(processor, [qa_example(processor, r) for r in rows], max_length)
    if cfg.distill_tokens != "entity":
        return data, {}
    missing = sorted({r.person_id for r in rows} - set(entity_names or {}))
    if missing:
        raise ValueError(f"distill_tokens='entity' needs every forget person's name; missing: {missing[:5]}")
    mask = rows_entity_mask(processor, data.input_ids, rows, entity_names)
    data.token_masks[ENTITY_MASK] = mask
    return data, {"entity_rows": float((mask.sum(1) > 0).mean()), "entity_tokens": int(mask.sum())}


def unlearn_vl_eraser(model, params, processor, forget_rows: Sequence[mllmu.TrainingRow],
                      retain_rows: Sequence[mllmu.TrainingRow], cfg: VLEraserConfig, run: tr.RunSettings, *,
                      entity_names: dict[str, str] | None = None, sharding=None, log=print, log_path=None,
                      tensorboard_dir=None) -> tuple[Any, dict, dict | None, dict]:
    """VL-Eraser: vacuum projectors from `retain_rows`, distillation on `forget_rows`, deletion.

    entity_names: {person_id: name} of the forget people (distill_tokens="entity").
    Returns (unlearned params, the LoRA it deleted (calibrated scales folded into B), the vacuum projectors or
    None, info with timings, history and the per-block scales; info["lora_merge_weight"] = −α: the unlearned
    model is the params plus that weight times the LoRA).
    sharding: a `parallel.Sharder`: retain statistics, distillation and the deletion run sharded over its mesh.
    log_path / tensorboard_dir: the distillation's metric log (`TrainConfig`).
    """
    info: dict[str, Any] = {"config": dataclasses.asdict(cfg), "run": dataclasses.asdict(run),
                            "lora_merge_weight": -float(cfg.deletion_strength)}
    projectors = None
    if cfg.vacuum:
        projectors, vacuum_info = vacuum_projectors_for(model, params, processor, retain_rows, cfg,
                                                        max_length=run.max_length, sharding=sharding, log=log)
        info.update(vacuum_info)
    rows = list(forget_rows)
    if not rows:
        raise ValueError("the forget set has no training rows")
    data, entity_info = forget_data(processor, rows, cfg, run.max_length, entity_names)
    info.update(entity_info)
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
    scales = least_squares_scales(model, params, lora, projectors, epoch_batches(data, run.batch_size, run.seed))
    info["least_squares_scales"] = scales
    if cfg.deletion_scale == "calibrated":
        lora = rescale(lora, scales)
    unlearned = delete(params, lora, projectors, cfg.deletion_strength, sharding=sharding)
    jax.block_until_ready(unlearned)
    info["delete_seconds"] = time.perf_counter() - t0
    shown = ", ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in scales.items())
    log(f"distillation: {run.steps} steps in {result.seconds:.1f} s (distill {result.history[-1]['distill']:.3f}, "
        f"ce {result.history[-1]['ce']:.3f}); least-squares scales {shown} ({cfg.deletion_scale} deletion, "
        f"α {cfg.deletion_strength}) in {info['delete_seconds']:.1f} s")
    return unlearned, lora, projectors, info
