"""The one training loop every stage and method uses.

A method supplies `loss_fn(frozen, trainable, batch, rng) -> (loss, aux)`: `trainable` is the pytree the
optimizer updates (a parameter subset, a LoRA tree, ...), `frozen` everything else it needs. The
trainer owns the optimizer (optax AdamW, warmup + decay, global-norm clipping, gradient accumulation
with `optax.MultiSteps`), the jitted step (state donated), orbax checkpoints with exact resume, a
progress bar, a JSONL metric log (and TensorBoard scalars, with tensorboardX), and the refusal to go
on after a non-finite loss or gradient.

Batches come from `batch_fn(step) -> batch`, a pure function of the step, so a resumed run sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm.auto import tqdm

from ..models.configs import ConfigError
from ..processing import IGNORE_INDEX

LOG_NAME = "train.jsonl"  # a method run's metric log in its run directory; a stage's is `<stage dir>.train.jsonl`


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stopped being finite; the last good checkpoint is left untouched."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    total_steps: int
    learning_rate: float = 1e-3
    schedule: str = "cosine"  # "cosine" | "linear" | "constant", after a linear warmup
    warmup_steps: int = 0
    end_lr_factor: float = 0.0  # final lr = learning_rate * end_lr_factor
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # ((regex searched in the '/'-joined parameter path, factor), ...): that module's learning rate is
    # factor x the schedule's; the first matching regex wins, unmatched parameters keep factor 1
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    grad_accum_steps: int = 1  # optimizer updates every k micro-batches (total_steps counts micro-batches)
    seed: int = 0
    log_every: int = 10
    checkpoint_dir: str | None = None
    save_every: int = 0  # 0: only at the end (when checkpoint_dir is set)
    keep_checkpoints: int = 2
    log_path: str | None = None  # JSONL metrics, one object per logged step (appended: a resumed run continues it)
    tensorboard_dir: str | None = None  # the same scalars as TensorBoard events (needs tensorboardX)
    progress: bool = True
    description: str = "training"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The optimisation settings every unlearning method's run has (VL-Eraser's distillation and each baseline):
    `steps` (when a method counts steps rather than epochs), batch size, learning rate, warmup, the tokenised
    length and the seed."""

    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    max_length: int = 128
    seed: int = 0


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


# ------------------------------------------------------------------ parameter selection by regex


def flat_paths(tree) -> dict[str, Any]:
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def partition(params, trainable_regex: str) -> tuple[dict, dict]:
    """Split a parameter tree into (trainable, frozen) by a regex searched in '/'-joined paths."""
    pattern = re.compile(trainable_regex)
    flat = traverse_util.flatten_dict(params)
    train = {k: v for k, v in flat.items() if pattern.search("/".join(k))}
    if not train:
        raise ValueError(f"trainable pattern {trainable_regex!r} matches no parameter")
    frozen = {k: v for k, v in flat.items() if k not in train}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `partition`."""
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------ losses shared by every method


def token_nll(logits, labels):
    """Per-sequence summed next-token NLL and token counts. labels align with inputs (shifted here);
    IGNORE_INDEX positions do not count. Returns (nll_sum [B], count [B]) in f32."""
    targets = labels[:, 1:]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    valid = targets != IGNORE_INDEX
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -(picked * valid).sum(-1), valid.sum(-1).astype(jnp.float32)


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy over all answer tokens of the batch."""
    nll, count = token_nll(logits, labels)
    return nll.sum() / jnp.maximum(count.sum(), 1.0)


# ------------------------------------------------------------------ optimizer


SCHEDULES = ("cosine", "linear", "constant")


def _check_schedule(kind: str) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")


def schedule_value(count, peak, warmup, decay_steps, end_factor, kind: str):
    """The learning rate after `count` optimizer updates: a linear warmup from 0 to `peak` over `warmup` updates,
    then `kind` ("cosine" | "linear" to `peak · end_factor` over `decay_steps`, or "constant"). Array arguments
    are fine: the optimizer keeps them in its state (`make_optimizer`), so stages and settings that differ only
    in them run one compiled program."""
    _check_schedule(kind)
    count = jnp.asarray(count, jnp.float32)
    after = jnp.clip(count - warmup, 0.0, decay_steps) / jnp.maximum(decay_steps, 1)
    if kind == "cosine":
        decayed = peak * ((1.0 - end_factor) * 0.5 * (1.0 + jnp.cos(jnp.pi * after)) + end_factor)
    elif kind == "linear":
        decayed = peak + (peak * end_factor - peak) * after
    else:
        decayed = peak * jnp.ones_like(after)
    warming = peak * count / jnp.maximum(warmup, 1)
    return jnp.where(count < warmup, warming, decayed)


def schedule_arguments(cfg: TrainConfig) -> dict:
    """`schedule_value`'s arguments for a training config (its step counts in optimizer updates); an unknown
    schedule fails here, when the optimizer is built, not when the step is first traced."""
    _check_schedule(cfg.schedule)
    updates = max(cfg.total_steps // cfg.grad_accum_steps, 1)
    warmup = min(cfg.warmup_steps // cfg.grad_accum_steps, updates)
    return {"peak": float(cfg.learning_rate), "warmup": float(warmup), "decay_steps": float(max(updates - warmup, 1)),
            "end_factor": float(cfg.end_lr_factor), "kind": cfg.schedule}


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning rate the optimizer of `cfg` uses after `count` updates (what the trainer logs)."""
    arguments = schedule_arguments(cfg)
    return lambda count: schedule_value(count, **arguments)


def _decay_mask(tree):
    """Weight decay on matrices only (not norms, biases, scalars)."""
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, tree)


def scale_by_path(multipliers: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiply each parameter's update by the factor of the first regex that matches its path (else 1).

    Placed after AdamW, this is a per-module learning rate (decoupled weight decay scales with it).
    """
    compiled = [(re.compile(pattern), float(factor)) for pattern, factor in multipliers]

    def factor(path) -> float:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return next((f for pattern, f in compiled if pattern.search(name)), 1.0)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: u * factor(path), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _scheduled_adamw(peak, warmup, decay_steps, end_factor, weight_decay, b1, b2, eps, kind: str, mask):
    schedule = lambda count: schedule_value(count, peak, warmup, decay_steps, end_factor, kind)
    return optax.adamw(schedule, b1, b2, eps, weight_decay=weight_decay, mask=mask)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, AdamW on the schedule (decay on matrices only), per-module factors. The schedule's
    and AdamW's numbers live in the optimizer state (`optax.inject_hyperparams`), not in the compiled step: the
    base, oracle and vanilla stages, or a sweep's learning rates, share programs through the compilation cache."""
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    arguments = schedule_arguments(cfg)
    parts.append(optax.inject_hyperparams(_scheduled_adamw, static_args=("kind", "mask"))(
        weight_decay=float(cfg.weight_decay), b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
        mask=_decay_mask, **arguments))
    if cfg.lr_multipliers:
        parts.append(scale_by_path(cfg.lr_multipliers))
    tx = optax.chain(*parts)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx


# ------------------------------------------------------------------ the step and the loop


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, sharding=None,
                    gradient_fn: Callable | None = None):
    """Jitted (state, frozen, batch) -> (state, metrics); the state's buffers are donated.

    sharding: a `parallel.Sharder`: the step is then jitted with explicit in/out shardings (state and
    frozen trees by the parameter rules, the batch over the `batch` axis, metrics replicated).
    gradient_fn: (grads, frozen, batch) -> grads, applied to the raw gradient before the optimizer (e.g.
    MMUnlearner's clip-then-mask); the logged grad_norm is the raw gradient's.
    """

    def step(state: TrainState, frozen, batch):
        rng, sub = jax.random.split(state.rng)
        (loss, aux), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(frozen, state.trainable, batch, sub)
        raw = grads
        if gradient_fn is not None:
            grads = gradient_fn(grads, frozen, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(raw), **aux}
        return TrainState(state.step + 1, trainable, opt_state, rng), metrics

    if sharding is None:
        return jax.jit(step, donate_argnums=(0,))
    return sharding.jit(
        step,
        lambda state, frozen, batch: (state_shardings(state, sharding), sharding.tree(frozen), sharding.batch(batch)),
        lambda state, frozen, batch: (state_shardings(state, sharding), sharding.replicated),
        donate_argnums=(0,),
    )


def state_shardings(state: TrainState, sharding) -> TrainState:
    """A TrainState of shardings: trainable and optimizer moments by the parameter rules (optax states
    hold copies of the trainable tree at the same path suffixes), counters and the key replicated."""
    return TrainState(sharding.replicated, sharding.tree(state.trainable), sharding.tree(state.opt_state),
                      sharding.replicated)


def _fresh_state(trainable, tx, seed: int) -> TrainState:
    return TrainState(jnp.asarray(0, jnp.int32), trainable, tx.init(trainable), jax.random.PRNGKey(seed))


def init_state(trainable, tx: optax.GradientTransformation, seed: int, sharding=None) -> TrainState:
    """The initial state. With `sharding`, built under jit with out_shardings (each device creates only its
    shards of the optimizer moments)."""
    if sharding is None:
        # The step donates the state's buffers; copy so the caller's arrays survive training.
        trainable = jax.tree_util.tree_map(jnp.array, trainable)
        return _fresh_state(trainable, tx, seed)
    abstract = jax.eval_shape(lambda t: _fresh_state(t, tx, seed), trainable)
    trainable = sharding.put(trainable, sharding.tree(trainable))
    # jit outputs never alias undonated inputs: the caller's arrays survive the donating steps.
    return jax.jit(lambda t: _fresh_state(t, tx, seed), out_shardings=state_shardings(abstract, sharding))(trainable)


def _checkpoint_manager(cfg: TrainConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(cfg.checkpoint_dir).absolute(), options=options)


def _restore(manager, template: TrainState) -> TrainState | None:
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError as err:  # orbax: the saved tree's structure differs from this run's state
        raise ValueError(f"{manager.directory}: the checkpoint of step {step} does not match this run's training "
                         f"state (written by another version of the trainer or another setup); move it away or "
                         f"retrain from scratch (`--force` for a stage). orbax said: {err}") from err


def _save(manager, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


def require_tensorboard():
    """tensorboardX's SummaryWriter, or a ConfigError saying how to get it (it is an optional extra)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError("TensorBoard logging is on (log.tensorboard) but tensorboardX is not installed: "
                          "pip install 'vleraser_jax[tensorboard]' (tensorboardX), or set "
                          "--config.log.tensorboard=False") from None
    return SummaryWriter


class MetricLog:
    """Where logged steps go: the JSONL file and, optionally, TensorBoard scalars `train/<metric>`."""

    def __init__(self, cfg: TrainConfig):
        writer = require_tensorboard() if cfg.tensorboard_dir else None  # before the file: fail with nothing opened
        self.jsonl = open(cfg.log_path, "a") if cfg.log_path else None
        self.tensorboard = writer(logdir=cfg.tensorboard_dir) if writer else None

    def write(self, record: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        for out in (self.jsonl, self.tensorboard):
            if out is not None:
                out.close()


@dataclasses.dataclass
class TrainResult:
    trainable: Any
    history: list[dict]
    seconds: float
    resumed_from: int | None


def train(
    loss_fn: Callable,
    trainable,
    frozen,
    batch_fn: Callable[[int], Any],
    cfg: TrainConfig,
    *,
    stop_after: int | None = None,
    sharding=None,
    gradient_fn: Callable | None = None,
) -> TrainResult:
    """Run `cfg.total_steps` micro-steps (resuming from `cfg.checkpoint_dir` if it holds a checkpoint).

    stop_after: end early after that step *as if interrupted* (saving a checkpoint first); used to
    prove that a resumed run ends where an uninterrupted one does.
    sharding: a `parallel.Sharder`; state, frozen tree and batches are then sharded over its mesh
    (`batch_fn` returns the global batch, the same on every process).
    """
    tx = make_optimizer(cfg)
    state = init_state(trainable, tx, cfg.seed, sharding)
    if sharding is not None:
        frozen = sharding.put(frozen, sharding.tree(frozen))
    manager = _checkpoint_manager(cfg) if cfg.checkpoint_dir else None
    resumed_from = None
    if manager is not None:
        restored = _restore(manager, state)
        if restored is not None:
            state, resumed_from = restored, int(restored.step)
    step_fn = make_train_step(loss_fn, tx, sharding, gradient_fn)
    schedule = learning_rate_schedule(cfg)
    history: list[dict] = []
    log = MetricLog(cfg)
    start_step = int(state.step)
    bar = tqdm(total=cfg.total_steps, initial=start_step, desc=cfg.description, unit="step",
               disable=not cfg.progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    window_start, window_items = time.perf_counter(), 0
    try:
        for step in range(start_step, cfg.total_steps):
            batch = batch_fn(step)
            state, metrics = step_fn(state, frozen, batch)
            window_items += _batch_size(batch)
            last = step + 1 == cfg.total_steps
            interrupt = stop_after is not None and step + 1 == stop_after
            logging_now = (step + 1) % cfg.log_every == 0 or last or interrupt
            saving = manager is not None and (last or interrupt or (cfg.save_every and (step + 1) % cfg.save_every == 0))
            if logging_now or saving:  # never checkpoint a state that has gone non-finite
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(np.isfinite(v) for v in metrics.values()):
                    bad = ", ".join(k for k, v in metrics.items() if not np.isfinite(v))
                    where = f"; the last good checkpoint in {cfg.checkpoint_dir} is kept" if manager else ""
                    raise TrainingDiverged(f"step {step + 1}: non-finite {bad}{where}")
            if logging_now:
                elapsed = time.perf_counter() - window_start
                record = {"step": step + 1, "lr": float(schedule((step + 1) // cfg.grad_accum_steps)),
                          "examples_per_s": window_items / max(elapsed, 1e-9), **metrics}
                window_start, window_items = time.perf_counter(), 0
                history.append(record)
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_s']:.1f}")
            bar.update(1)
            if saving:
                _save(manager, state)
            if stop_after is not None and step + 1 == stop_after:
                break
    finally:
        bar.close()
        log.close()
        if manager is not None:
            manager.close()
    return TrainResult(state.trainable, history, time.perf_counter() - t0, resumed_from)


def _batch_size(batch) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    return int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "ndim", 0) else 1
