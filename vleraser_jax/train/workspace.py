"""Where a config's stages live: the benchmark root (synthesized if missing), the tokenizer, and each stage's
cache directory, keyed by a hash of everything that stage's weights depend on (and nothing else)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from ..data import synthetic
from ..unlearn.trainer import require_tensorboard


STAGES = ("base", "oracle", "vanilla")
# bump a stage's number when training code changes what its cached model would contain
# (base 3: the tokenizer's corpus includes the holdout people)
CODE_VERSIONS = {"base": 3, "oracle": 3, "vanilla": 3}
# data fields that do not change what the base stage trains on (who is forgotten, validated on or held out)
_SPLIT_DATA_FIELDS = ("forget_ratio", "validation_people", "num_holdout")
# stage fields that change how a run executes, not the weights it ends with (a resumed run may change them)
_EXECUTION_ONLY_STAGE_FIELDS = ("save_every",)


# ------------------------------------------------------------------ config -> paths, model


def tensorboard_on(c) -> bool:
    """`c.log.tensorboard` (off without a `log` section); when on, tensorboardX must be installed (ConfigError)."""
    on = bool((c.get("log") or {}).get("tensorboard", False))
    if on:
        require_tensorboard()
    return on


def use_compilation_cache(c) -> Path | None:
    """Keep compiled XLA programs under <work_dir>/xla_cache (JAX's persistent compilation cache): every method
    run, sweep trial and attack builds its own jitted steps, the same programs each time, and recompiling them
    was most of a short run's time (NPO on tiny_llava: 30 of 43 s). Call before anything compiles. JAX's own
    variables win: JAX_COMPILATION_CACHE_DIR elsewhere, JAX_ENABLE_COMPILATION_CACHE=false off (returns None)."""
    if not jax.config.jax_enable_compilation_cache:  # JAX parsed its variables at import
        return None
    path = Path(jax.config.jax_compilation_cache_dir or Path(c.work_dir) / "xla_cache")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)  # the evaluation's programs too
    return path


def _plain(config) -> dict:
    return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _section(c, name: str) -> dict:
    return {k: v for k, v in _plain(c.get(name) or {}).items() if k not in _EXECUTION_ONLY_STAGE_FIELDS}


def oracle_enabled(c) -> bool:
    return bool(c.get("oracle") and c.oracle.get("enabled", True))


def vanilla_from_oracle(c) -> bool:
    return bool(c.vanilla.get("from_oracle", False))


def split_fields(c) -> dict:
    """Who the oracle is retrained without: the forget split and the validation people."""
    return {"forget_ratio": c.data.forget_ratio, "validation_people": c.data.get("validation_people", 0)}


def stage_key(c, stage: str) -> str:
    """A short hash of everything the stage's result depends on (and nothing else).

    base: the data generator, model, base recipe. oracle: base's, plus its recipe and who it is retrained
    without (the forget split and the validation people). vanilla: its recipe on top of base's, or on top of
    the oracle's when it continues the oracle (`vanilla.from_oracle`).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    data = _without_default_fact_values({k: v for k, v in _plain(c.data).items() if k not in _SPLIT_DATA_FIELDS})
    parts = {"code": CODE_VERSIONS["base"], "seed": c.seed, "data": data, "model": _plain(c.model),
             "base": _section(c, "base")}
    if c.get("family", "llava") != "llava":  # LLaVA's keys predate the field; they stay valid
        parts["family"] = c.family
    if stage == "oracle" or (stage == "vanilla" and vanilla_from_oracle(c)):
        parts.update(code_oracle=CODE_VERSIONS["oracle"], oracle=_section(c, "oracle"), split=split_fields(c))
    if stage == "vanilla":
        parts.update(code_vanilla=CODE_VERSIONS["vanilla"], vanilla=_section(c, "vanilla"))
    return _hash(parts)


def _synthetic_params(c) -> dict:
    d = c.data
    return {"seed": c.seed, "num_people": d.num_people, "num_celebrities": d.num_celebrities,
            "image_size": d.image_size, "num_base_portraits": d.num_base_portraits,
            "num_base_poses": d.num_base_poses, "num_holdout": d.get("num_holdout", 0),
            "fact_values": d.get("fact_values", "shared")}


def _without_default_fact_values(fields: dict) -> dict:
    """`fields` less `fact_values` when it is "shared": the keys of benchmarks and stages made before the field."""
    return {k: v for k, v in fields.items() if not (k == "fact_values" and v == "shared")}


def data_root(c) -> Path:
    """The benchmark root: `data.root`, or a synthetic one keyed by its generator parameters."""
    if c.data.root:
        return Path(c.data.root)
    if c.data.source != "synthetic":
        raise ValueError(f"data.root must be set (a local MLLMU-Bench copy) for data.source={c.data.source!r}")
    params = _without_default_fact_values(_synthetic_params(c))
    key = _hash({**params, "version": synthetic.GENERATOR_VERSION, "vocab_size": c.data.vocab_size})
    return Path(c.work_dir) / f"synthetic-{c.seed}-{key[:8]}"


def stage_dir(c, stage: str) -> Path:
    return Path(c.work_dir) / "models" / f"{c.name}-{stage}-{stage_key(c, stage)}"


def prepare_data(c, log=print) -> tuple[Path, Path]:
    """The benchmark root and the tokenizer directory, synthesizing them if missing."""
    root = data_root(c)
    if c.data.source != "synthetic":
        if not root.is_dir():
            raise FileNotFoundError(f"data.root {root} does not exist (data.source={c.data.source!r})")
        return root, Path(c.model.checkpoint)
    want = _synthetic_params(c)
    if (root / synthetic.INFO_FILE).exists():
        info = synthetic.read_info(root)
        have = {**{k: info.get(k) for k in want}, "fact_values": synthetic.fact_values_of(info)}
        if have != want or info.get("version") != synthetic.GENERATOR_VERSION:
            raise ValueError(f"{root} holds a synthetic benchmark made with {have} (version {info.get('version')}), "
                             f"not the config's {want} (version {synthetic.GENERATOR_VERSION})")
    else:
        log(f"writing the synthetic benchmark to {root}")
        synthetic.synthesize(root, **want, overwrite=True)
    family = c.get("family", "llava")
    if family == "llava":
        tok_dir = root / "tokenizer"
        extra = {}
    else:  # its image processor depends on the patch and merge sizes
        tok_dir = root / f"tokenizer-{family}-p{c.model.patch_size}m{c.model.merge_size}"
        extra = {"patch_size": c.model.patch_size, "merge_size": c.model.merge_size}
    if not (tok_dir / "tokenizer.json").exists():
        log(f"training the {family} tokenizer into {tok_dir}")
        synthetic.train_synthetic_tokenizer(root, tok_dir, vocab_size=c.data.vocab_size, image_size=c.data.image_size,
                                            family=family, **extra)
    return root, tok_dir


def processor_dir(config, tok_dir: Path, path: Path) -> Path:
    """A directory `load_processor` accepts: the tokenizer files plus this model's config.json."""
    path.mkdir(parents=True, exist_ok=True)
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, path / f.name)
    (path / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    return path


def model_runtime(c) -> dict:
    """How a loaded checkpoint runs (compute dtype, attention backend, remat policy, the dtype parameters are
    held in), from `c.model`. `model.frozen_dtype` "bfloat16" holds every loaded weight in bf16: LoRA methods train
    f32 adapters over it, full-parameter training keeps f32 masters of what it trains (`full_training_state`)."""
    return {"dtype": c.model.dtype, "attention_impl": c.model.attention, "remat": c.model.get("remat"),
            "param_dtype": jnp.dtype(c.model.get("frozen_dtype") or "float32")}
