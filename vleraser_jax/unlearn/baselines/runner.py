"""Running one baseline end to end on a model: data -> (Fisher mask) -> training -> unlearned parameters."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
from flax import traverse_util

from ...data.batching import BatchSchedule, epoch_batches, group_lengths, qa_example, tokenize
from .. import lora as lora_lib
from .. import trainer as tr
from ..adapter import Adapter, full_training_state, lora_training_state
from .config import BaselineConfig, baseline_config, reference_run_settings
from .losses import baseline_loss_fn
from .mmunlearner import clip_then_mask, fisher_diagonals, fisher_rows, mask_report, saliency_mask
from .schedules import PairedSchedule, batches_per_epoch, step_plan


def prepare(model, params, cfg: BaselineConfig, rng=None, ref_params=None, mask=None):
    """(adapter, trainable, frozen) for `cfg`. ref_params: NPO's reference model (None: vanilla).
    mask: MMUnlearner's saliency mask (a tree over parameter paths), stored as frozen["mask"]."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    adapter = Adapter(model, cfg.lora)
    if cfg.lora:
        a_std = cfg.lora_a_std if cfg.lora_a_std is not None else 1.0 / cfg.lora_rank  # PEFT's gaussian init
        trainable, frozen = lora_training_state(
            params, lora_lib.init(params, cfg.lora_rank, cfg.lora_alpha, rng, cfg.lora_pattern, a_std=a_std))
    else:
        trainable, frozen = full_training_state(params, cfg.trainable)
        if cfg.method in ("kl", "npo"):
            frozen["vanilla"] = trainable  # the trainer copies what it trains; these stay the originals
    if ref_params is not None:
        frozen["ref"] = ref_params
    if cfg.method == "mmunlearner":
        if mask is None:
            raise ValueError("MMUnlearner needs its saliency mask (see `saliency_mask`)")
        have = traverse_util.flatten_dict(trainable)
        frozen["mask"] = traverse_util.unflatten_dict(
            {k: v for k, v in traverse_util.flatten_dict(mask).items() if k in have})
    return adapter, trainable, frozen


def run_plan(cfg: BaselineConfig, run: tr.RunSettings, forget_rows: int, retain_rows: int):
    """The step plan (`step_plan`) of a baseline run on that many forget / retain training rows."""
    needs_retain = cfg.order != "forget"
    return step_plan(cfg.order, batches_per_epoch(forget_rows, run.batch_size),
                     batches_per_epoch(retain_rows, run.batch_size) if needs_retain else 0,
                     epochs=cfg.epochs, steps=run.steps)


def _training_data(processor, f_rows, r_rows, cfg: BaselineConfig, run: tr.RunSettings):
    """(forget data, retain data or None, the step plan, the batch function) of one baseline run."""
    needs_retain = cfg.order != "forget"
    f_data = tokenize(processor, [qa_example(processor, r) for r in f_rows], run.max_length)
    r_data = tokenize(processor, [qa_example(processor, r) for r in r_rows], run.max_length) if needs_retain else None
    plan = run_plan(cfg, run, len(f_rows), len(r_rows))
    n_f, n_r = int((plan[:, 0] >= 0).sum()), int((plan[:, 1] >= 0).sum())
    f_sched = BatchSchedule([(f_data, 1.0)], run.batch_size, n_f, run.seed, cfg.length_buckets) if n_f else None
    r_sched = BatchSchedule([(r_data, 1.0)], run.batch_size, n_r, run.seed + 1, cfg.length_buckets) if n_r else None
    return f_data, r_data, plan, PairedSchedule(plan, f_sched, r_sched)


def mmunlearner_mask(model, params, processor, cfg: BaselineConfig, run: tr.RunSettings, f_rows, r_rows, full_rows,
                     f_data, r_data, *, sharding=None, log=print) -> tuple[dict, dict]:
    """MMUnlearner's saliency mask from the diagonal Fisher on its preserve sets; returns (mask, info)."""
    t0 = time.perf_counter()
    fisher_f_rows, fisher_r_rows = fisher_rows(f_rows, r_rows, full_rows, cfg.fisher_sets)
    if cfg.fisher_sets == "retain":  # the training sets themselves, already tokenized
        datas = [f_data, r_data]
    else:
        datas = [tokenize(processor, [qa_example(processor, r) for r in rows], run.max_length)
                 for rows in (fisher_f_rows, fisher_r_rows)]
    lengths = group_lengths(*datas)  # both sets share the compiled programs
    fisher = fisher_diagonals(model, params, [epoch_batches(d, cfg.fisher_batch_size, run.seed, lengths)
                                              for d in datas], cfg.mask_pattern, sharding)
    mask = saliency_mask(fisher[0], fisher[1], cfg.mask_threshold, cfg.mask_eps)
    jax.block_until_ready(mask)
    report = mask_report(mask)
    info = {"mask_seconds": time.perf_counter() - t0,
            "mask_report": {k: v for k, v in report.items() if k != "per_parameter"}}
    log(f"MMUnlearner: saliency mask from {len(fisher_f_rows)} forget / {len(fisher_r_rows)} retain rows in "
        f"{info['mask_seconds']:.1f} s, {report['selected_fraction']:.1%} of the masked weights selected")
    return mask, info


def unlearn_baseline(
    model,
    params,
    processor,
    forget_rows: Sequence,
    retain_rows: Sequence,
    name: str,
    settings: BaselineConfig | dict | None = None,
    run: tr.RunSettings | None = None,
    *,
    full_rows: Sequence = (),
    ref_params=None,
    progress: bool = True,
    log=print,
    sharding=None,
    log_path=None,
    tensorboard_dir=None,
) -> tuple[Any, dict | None, dict]:
    """Baseline `name` trained on `forget_rows` (and `retain_rows` where it has retain steps); returns
    (unlearned params, the trained LoRA or None for a full-parameter run, info with timings and history;
    with a LoRA, info["lora_merge_weight"] = 1: the unlearned model is the params plus the LoRA).

    settings: a BaselineConfig, or a dict of fields over the registry defaults (None: the defaults).
    run: the optimizer settings (`steps` used when settings.epochs is None); None: `reference_run_settings(name)`.
    full_rows: every person's training rows (MMUnlearner's "mmunlearner" preserve sets read the text-only ones).
    ref_params: NPO's reference model (e.g. a retain-only fine-tune; None: the vanilla `params`). The returned
    parameters have the input's structure (a LoRA is merged into the kernels).
    sharding: a `parallel.Sharder`: Fisher statistics and every training step run sharded over its mesh.
    log_path / tensorboard_dir: the training's metric log (`TrainConfig`).
    """
    t_start = time.perf_counter()
    title, cfg = baseline_config(name, settings)
    run = run if run is not None else reference_run_settings(name)
    info: dict[str, Any] = {"method": name, "title": title, "config": dataclasses.asdict(cfg),
                            "run": dataclasses.asdict(run)}
    f_rows, r_rows = list(forget_rows), list(retain_rows)
    if not f_rows:
        raise ValueError("the forget set has no training rows")
    if cfg.order != "forget" and not r_rows:
        raise ValueError(f"{title} needs retain rows")
    t0 = time.perf_counter()
    f_data, r_data, plan, batch_fn = _training_data(processor, f_rows, r_rows, cfg, run)
    info["data_seconds"] = time.perf_counter() - t0
    info["steps"], info["forget_steps"], info["retain_steps"] = len(plan), batch_fn.forget_steps, batch_fn.retain_steps
    mask = None
    if cfg.method == "mmunlearner":
        mask, mask_info = mmunlearner_mask(model, params, processor, cfg, run, f_rows, r_rows, list(full_rows),
                                           f_data, r_data, sharding=sharding, log=log)
        info.update(mask_info)
    adapter, trainable, frozen = prepare(model, params, cfg, jax.random.PRNGKey(run.seed), ref_params, mask)
    mmunlearner = cfg.method == "mmunlearner"  # clips inside its gradient_fn, before the mask
    train_cfg = tr.TrainConfig(
        total_steps=len(plan), learning_rate=run.learning_rate, schedule=cfg.lr_schedule,
        warmup_steps=run.warmup_steps, end_lr_factor=0.0, weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
        max_grad_norm=None if mmunlearner else cfg.max_grad_norm, seed=run.seed, log_every=max(len(plan) // 20, 1),
        progress=progress, description=title, log_path=log_path, tensorboard_dir=tensorboard_dir,
    )
    result = tr.train(baseline_loss_fn(adapter, cfg), trainable, frozen, batch_fn, train_cfg, sharding=sharding,
                      gradient_fn=clip_then_mask(cfg.max_grad_norm) if mmunlearner else None)
    info["train_seconds"] = result.seconds
    info["history"] = result.history
    t0 = time.perf_counter()
    unlearned = adapter.unlearned_params(frozen, result.trainable)
    lora = tr.merge(result.trainable, frozen["lora_scales"]) if cfg.lora else None
    if lora is not None:
        info["lora_merge_weight"] = 1.0
    jax.block_until_ready(unlearned)
    info["merge_seconds"] = time.perf_counter() - t0
    info["total_seconds"] = time.perf_counter() - t_start
    last = result.history[-1] if result.history else {}
    log(f"{title}: {len(plan)} steps ({batch_fn.forget_steps} forget, {batch_fn.retain_steps} retain) in "
        f"{result.seconds:.1f} s; last "
        + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k in ("loss", "forget_nll", "retain_nll", "kl")))
    return unlearned, lora, info
