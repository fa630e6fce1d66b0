"""`run_stage`: train (or reuse) one stage of a config and export it as a Hugging Face checkpoint."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax

from .. import parallel
from ..checkpoints import architecture_for, load_pretrained, load_pretrained_sharded, save_pretrained
from ..data.batching import BatchSchedule
from ..io import write_text_atomic
from ..processing import load_processor
from ..unlearn import lora as lora_lib
from ..unlearn import trainer as tr
from ..unlearn.adapter import full_training_state, lm_loss_fn, lora_training_state
from .recipes import training_sources
from .tiny_models import init_from_scratch, model_config
from .workspace import (STAGES, model_runtime, oracle_enabled, prepare_data, processor_dir, stage_dir, stage_key,
                        tensorboard_on, vanilla_from_oracle)


def stage_steps(sc, rows: int) -> int:
    """`sc.steps`, or `sc.epochs` passes over `rows` training rows at `sc.batch_size` (MLLMU-Bench counts epochs)."""
    if sc.get("steps"):
        return int(sc.steps)
    if sc.get("epochs"):
        return max(1, -(-int(sc.epochs * rows) // sc.batch_size))
    raise ValueError("a training stage needs `steps` or `epochs`")


def _starting_model(c, stage: str, tok_dir: Path, out: Path, sharding, log):
    """(model, params, config, processor directory) the stage starts from: a fresh init for base; the oracle's
    export for a vanilla that continues it; else the base stage's export (read shard by shard onto the mesh
    when there is one)."""
    if stage == "base":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        config = model_config(c, tokenizer)
        model = architecture_for(config.model_type).model_cls(config)
        return model, init_from_scratch(model, c.seed), config, processor_dir(config, tok_dir, out.with_name(
            out.name + ".processor"))
    base_dir = run_stage(c, "oracle" if stage == "vanilla" and vanilla_from_oracle(c) else "base", log=log)
    if sharding is not None:  # each process reads only its shards of the base model
        model, params, config = load_pretrained_sharded(base_dir, sharding, **model_runtime(c))
    else:
        model, params, config = load_pretrained(base_dir, **model_runtime(c))
    return model, params, config, base_dir


def _train_config(c, stage: str, sc, steps: int, out: Path, force: bool, tensorboard: bool) -> tr.TrainConfig:
    defaults = tr.TrainConfig(total_steps=steps)
    save_every = sc.get("save_every", 0)
    checkpoints = out.with_name(out.name + ".ckpt")
    if force and checkpoints.exists():  # retrain from scratch, not from the last run's saved steps
        shutil.rmtree(checkpoints)
    return tr.TrainConfig(
        total_steps=steps, learning_rate=sc.learning_rate, seed=c.seed, log_every=max(steps // 40, 1),
        **{name: sc.get(name, getattr(defaults, name))
           for name in ("warmup_steps", "schedule", "end_lr_factor", "weight_decay")},
        lr_multipliers=tuple((str(pattern), float(f)) for pattern, f in sc.get("lr_multipliers", ())),
        # periodic orbax saves make a long (7B) run resumable: rerunning the command continues it
        checkpoint_dir=str(checkpoints) if save_every else None, save_every=save_every,
        description=f"{stage} model", log_path=str(out.with_name(f"{out.name}.{tr.LOG_NAME}")),
        tensorboard_dir=str(out.with_name(out.name + ".tensorboard")) if tensorboard else None,
    )


def _train(c, model, params, sc, schedule, train_cfg, sharding):
    """Train every parameter, or (`sc.lora_rank` > 0) a LoRA on `sc.lora_pattern` merged afterwards; returns
    (new params, the trainer's result)."""
    rank = sc.get("lora_rank", 0)
    if rank:
        trainable, frozen = lora_training_state(
            params, lora_lib.init(params, rank, float(sc.get("lora_alpha", rank)), jax.random.PRNGKey(c.seed),
                                  pattern=sc.get("lora_pattern", lora_lib.LM_LINEARS)))
    else:
        trainable, frozen = full_training_state(params, ".*")
    loss = lm_loss_fn(model, sc.get("loss", "token"), lora=bool(rank))
    result = tr.train(loss, trainable, frozen, schedule, train_cfg, sharding=sharding)
    if rank:
        return lora_lib.merge(params, tr.merge(result.trainable, frozen["lora_scales"])), result
    return tr.merge(result.trainable, frozen["params"]), result


def run_stage(c, stage: str, *, force: bool = False, log=print) -> Path:
    """Train (or reuse) one stage; returns its checkpoint directory.

    With `model.checkpoint` set (a real model, e.g. the 7B configs) the base stage *is* that checkpoint and
    only the vanilla stage trains. `<stage>.lora_rank` > 0 trains a LoRA on `<stage>.lora_pattern` (default:
    every LM linear, MLLMU-Bench's recipe) and merges it into the saved weights; `<stage>.epochs` sets the
    step count from the data size when `<stage>.steps` is absent.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "oracle" and not oracle_enabled(c):
        raise ValueError("the oracle stage is off for this config (oracle.enabled=False): it costs a fine-tune; "
                         "set --config.oracle.enabled=True to train it")
    if stage == "base" and c.model.get("checkpoint"):
        base = Path(c.model.checkpoint)
        if not (base / "config.json").is_file():
            raise FileNotFoundError(f"model.checkpoint {base} has no config.json")
        log(f"base: the pretrained checkpoint {base}")
        return base
    out = stage_dir(c, stage)
    if (out / "config.json").exists() and not force:
        log(f"{stage}: reusing {out}")
        return out
    tensorboard = tensorboard_on(c)  # on but not installed: fail before any work
    root, tok_dir = prepare_data(c, log)
    if c.data.source != "synthetic" and not c.model.get("checkpoint"):
        raise ValueError(f"model.checkpoint must be set (a local Hugging Face model directory) to train on "
                         f"data.source={c.data.source!r}; only the synthetic benchmark trains a base model from scratch")
    sharding = parallel.sharder_for(c)
    model, params, config, proc_dir = _starting_model(c, stage, tok_dir, out, sharding, log)
    processor = load_processor(proc_dir)
    sc = getattr(c, stage)
    t0 = time.perf_counter()
    sources = training_sources(c, stage, root, processor)
    steps = stage_steps(sc, sum(len(d) for d, _ in sources))
    schedule = BatchSchedule(sources, sc.batch_size, steps, c.seed, length_buckets=sc.get("length_buckets", 1))
    log(f"{stage}: {' + '.join(str(len(d)) for d, _ in sources)} rows tokenized in {time.perf_counter() - t0:.1f} s; "
        f"batch shapes {schedule.shapes}, {schedule.padding_fraction():.0%} padding")
    train_cfg = _train_config(c, stage, sc, steps, out, force, tensorboard)
    out.parent.mkdir(parents=True, exist_ok=True)  # the logs sit beside the model
    params, result = _train(c, model, params, sc, schedule, train_cfg, sharding)
    save_pretrained(params, config, out, copy_files_from=tok_dir)
    # the exported model is the result now; a finished run's optimizer checkpoints would only be restored
    # (with zero steps left) by a forced rerun
    shutil.rmtree(out.with_name(out.name + ".ckpt"), ignore_errors=True)
    _log_stage_done(c, stage, out, steps, sc, result, log)
    return out


def _log_stage_done(c, stage: str, out: Path, steps: int, sc, result, log) -> None:
    rank = sc.get("lora_rank", 0)
    final_loss = result.history[-1]["loss"] if result.history else None  # None: every step came from a checkpoint
    meta = {"stage": stage, "seconds": result.seconds, "final_loss": final_loss, "key": stage_key(c, stage),
            "steps": steps, "lora_rank": rank, "resumed_from": result.resumed_from}
    write_text_atomic(out.with_name(out.name + ".json"), json.dumps(meta, indent=2))
    what = f"a rank-{rank} LoRA (merged)" if rank else "every parameter"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    loss = f"final loss {final_loss:.3f}" if final_loss is not None else "no step left to run"
    log(f"{stage}: trained {what} for {steps} steps in {result.seconds:.0f} s ({loss}{resumed}) -> {out}")
