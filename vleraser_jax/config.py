"""Loading `configs/*.py` (ml_collections `get_config()` files) with `--config.a.b=value` overrides.

Override values are parsed as Python literals with `ast.literal_eval` (never `eval`), falling back to the
plain string, then checked against the field's existing type by ml_collections.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections

from .models.configs import ConfigError


def _literal(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of the file at `path`, then `a.b=value` overrides (a leading `--config.` is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"vleraser_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    config = module.get_config()
    for item in overrides:
        key, sep, value = item.removeprefix("--").removeprefix("config.").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected --config.field=value")
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in filter(None, parent.split(".")):
            if part not in node:
                raise ConfigError(f"override {item!r}: {path} has no field {key!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override {item!r}: {path} has no field {key!r}")
        new = _literal(value)
        old = node[leaf]
        if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
            new = float(new)
        if isinstance(old, str) and not isinstance(new, str):
            new = value
        if isinstance(old, tuple) and isinstance(new, list):
            new = tuple(new)
        try:
            node[leaf] = new
        except TypeError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return config


def add_mllmu_7b_sections(c: ml_collections.ConfigDict, *, max_length: int, image_size: int,
                          prompt_length: int) -> ml_collections.ConfigDict:
    """The sections every 7B config shares, so MLLMU-Bench's numbers live in one place: the local benchmark
    (`data`), its vanilla LoRA fine-tune, VL-Eraser stage 1, evaluation, one mesh over every device, and
    the shapes `vleraser plan` compiles. Only the lengths depend on the model's image tokens.
    """
    from .parallel import DEFAULT_RULES  # jax is not needed just to read a config

    c.data = ml_collections.ConfigDict()
    c.data.source = "mllmu"
    c.data.root = ""  # the local MLLMU-Bench copy (set it)
    c.data.forget_ratio = 5
    c.data.validation_people = 10  # retain people that play the forget set when settings are chosen

    # MLLMU-Bench's vanilla fine-tune: LoRA r16 α16, lr 2e-5, batch 4, 5 epochs on ft_Data.
    c.vanilla = ml_collections.ConfigDict()
    c.vanilla.lora_rank = 16
    c.vanilla.lora_alpha = 16
    c.vanilla.learning_rate = 2e-5
    c.vanilla.batch_size = 4
    c.vanilla.epochs = 5.0
    c.vanilla.max_length = max_length
    # LoRA on every LM linear (train.stages.run_stage's default pattern), merged into the saved vanilla model.
    # Linear decay without warmup, as the MLLMU-Bench unlearning scripts schedule their steps.
    c.vanilla.schedule = "linear"
    c.vanilla.warmup_steps = 0
    c.vanilla.save_every = 500  # orbax saves: an interrupted run resumes where it stopped
    c.vanilla.from_oracle = False  # MLLMU-Bench's vanilla: the base fine-tuned on every person
    # The oracle: MLLMU-Bench's recipe on ft_Data without the forget (and validation) people. Off by default:
    # it costs a second 7B fine-tune; --config.oracle.enabled=True trains it and adds the Oracle to the report.
    c.oracle = ml_collections.ConfigDict(c.vanilla.to_dict())
    del c.oracle.from_oracle
    c.oracle.enabled = False

    # VL-Eraser distillation (VLEraserConfig + RunSettings fields, read by experiment.methods.method_config).
    c.vl_eraser = ml_collections.ConfigDict()
    c.vl_eraser.rank = 16
    c.vl_eraser.lora_alpha = 16.0
    c.vl_eraser.lambda_ = 0.5
    c.vl_eraser.ce_mode = "added"
    # The choices the VL-Eraser issue (#18) measured on the tiny models, where they carry to 7B (README "VL-Eraser"):
    # distill the person's name and answer tokens, not the template every person shares; the vacuum from every
    # retain position (retain image keys left forget and retain answers equally outside their span), per-token
    # keys; the least-squares deletion scale, so α means a fraction of the distilled component at any width. The
    # energy kept and α are tiny_llava's selection (selection/vl_eraser.json: 90%, α 0.5 of 12 settings on
    # validation people); at 99% the tiny blocks kept 60-78% of F, past F/2, where P is stored dense (F² per block).
    c.vl_eraser.distill_tokens = "entity"
    c.vl_eraser.vacuum_source = "image+text"
    c.vl_eraser.pooling = "tokens"
    c.vl_eraser.threshold_mode = "energy"
    c.vl_eraser.threshold = 0.9
    c.vl_eraser.decomposition = "svd"  # of the second moment here: 7B keys never fit stacked (f64 host / f32 sharded)
    c.vl_eraser.deletion_scale = "calibrated"
    c.vl_eraser.deletion_strength = 0.5
    c.vl_eraser.steps = 100
    c.vl_eraser.batch_size = 4
    c.vl_eraser.learning_rate = 2e-5
    c.vl_eraser.warmup_steps = 0
    c.vl_eraser.max_length = max_length

    # eval.py's own choices, so the numbers stand beside the paper's Table 1: its first-character letter rule;
    # few-shot exemplar people per model (LLaVA 2, set in its config; chat models are evaluated zero-shot).
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.max_people = 0
    c.eval.few_shot_people = 0
    c.eval.letter_rule = "first_char"
    c.eval.likelihood_max_length = max_length

    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = False  # also TensorBoard events beside the JSONL metric logs (needs tensorboardX)

    # One mesh over every device: -1 fills. Override e.g. --config.mesh.fsdp=4 --config.mesh.tensor=2.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes (parallel.py)

    # Shapes `vleraser plan` compiles (stage 1 uses vl_eraser.batch_size / max_length).
    c.plan = ml_collections.ConfigDict()
    # vacuum basis columns the planner budgets for: F/2 − 1, the most a compact basis holds (beyond it P is stored
    # dense, F² per block); at 90% energy the tiny blocks kept 15-31% of F, so this bounds them if that carries
    c.plan.retained_rank = 5503
    c.plan.image_size = image_size
    c.plan.generate_batch = 16
    c.plan.prompt_length = prompt_length
    c.plan.max_new_tokens = 50
    c.plan.frozen_dtype = ""  # "": as the runtime (model.frozen_dtype); "float32" / "bfloat16" to compare
    c.plan.device_memory_gb = 0.0  # 0: do not judge; or pass --device-memory
    return c
