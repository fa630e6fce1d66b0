"""The paper's diagnostics and robustness attacks on an unlearned model (issue #7).

- Module reload (`reload_diagnostic`): the unlearned model with the *vanilla* model's multimodal projector
  (or vision tower) put back (`swap_modules`), scored on the forget set. The paper's diagnosis: reverse-
  training baselines "forget" by breaking vision↔language alignment, so reloading the original projector
  brings the knowledge back; a method that removed the knowledge from the language model is unmoved.
- Quantization attack (`quantization_attack`): weights rounded to int8 / 4-bit (`quantize_params`), scored
  on forget and retain; small weight edits that hide knowledge can be undone by rounding.
- Relearning attack (`relearning_attack`): the forget people split into halves A / B (`split_people`); a
  few fine-tuning steps on A's forget QA rows (`relearn`), then forget scored on A (trained on) and B (held
  out). Recovery on B means the knowledge was still there, only suppressed.

Every entry keeps the full results (set -> mode -> metric -> {value, ci_low, ci_high, n}) of each variant
and the changes against the unlearned model (`difference`, the one formula for "recovery"/"change");
`eval.report` renders them. Everything here is a function of parameter pytrees: inputs are never modified.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ..data.batching import BatchSchedule, qa_example, tokenize
from ..data.mllmu import Benchmark
from ..models.configs import ConfigError
from ..unlearn import trainer as tr
from ..unlearn.adapter import full_training_state, lm_loss_fn
from .evaluate import evaluate

KINDS = ("reload", "quantize", "relearn")
MODULES = ("projector", "vision")
QUANT_BITS = (8, 4)

# Per model family, (path prefix, module) rules over the parameter tree; the first matching prefix wins and
# unmatched parameters belong to the language model. LLaVA has its own top-level projector; Qwen2-VL's
# projector is the vision tower's patch merger (`vision/merger`, HF's `visual.merger`), the rest of
# `vision/` its ViT.
FAMILY_MODULES: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "llava": ((("projector",), "projector"), (("vision",), "vision")),
    "qwen2_vl": ((("vision", "merger"), "projector"), (("vision",), "vision")),
}

# Defaults of the config section `c.diagnostics` (read by `diagnostics_settings`).
DIAGNOSTICS_DEFAULTS: dict[str, Any] = {
    "reload": True,
    "quantize": True,
    "relearn": True,
    "quantize_bits": QUANT_BITS,
    "relearn_steps": 20,
    "relearn_learning_rate": 1e-4,
    "relearn_batch_size": 8,
    "relearn_max_length": 0,  # 0: VL-Eraser distillation's max_length (the length the unlearning trained with)
    # The attacker fine-tunes the language model, where the paper says reverse training leaves the knowledge;
    # vision tower and projector stay as the method left them.
    "relearn_trainable": "^llm/",
}


def diagnostics_settings(section: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
    """DIAGNOSTICS_DEFAULTS, then the config section `c.diagnostics`, then `overrides` (e.g. CLI flags); checked
    (ConfigError naming the field)."""
    settings = dict(DIAGNOSTICS_DEFAULTS)
    for source in (section or {}, overrides or {}):
        for key, value in dict(source).items():
            if key not in DIAGNOSTICS_DEFAULTS:
                raise ConfigError(f"c.diagnostics.{key}: unknown setting; known: {sorted(DIAGNOSTICS_DEFAULTS)}")
            settings[key] = value
    for key in KINDS:
        if not isinstance(settings[key], (bool, np.bool_)):
            raise ConfigError(f"c.diagnostics.{key} must be True or False, got {settings[key]!r}")
        settings[key] = bool(settings[key])
    bits = tuple(int(b) for b in settings["quantize_bits"])
    if not bits or set(bits) - set(QUANT_BITS):
        raise ConfigError(f"c.diagnostics.quantize_bits must be a non-empty subset of {QUANT_BITS}, got {bits}")
    settings["quantize_bits"] = bits
    for key, low in (("relearn_steps", 1), ("relearn_batch_size", 1), ("relearn_max_length", 0)):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"c.diagnostics.{key} must be an integer >= {low}, got {value!r}")
    if not isinstance(settings["relearn_learning_rate"], (int, float)) or not settings["relearn_learning_rate"] > 0:
        raise ConfigError(f"c.diagnostics.relearn_learning_rate must be > 0, got {settings['relearn_learning_rate']!r}")
    try:
        re.compile(settings["relearn_trainable"])
    except (re.error, TypeError) as e:
        raise ConfigError(f"c.diagnostics.relearn_trainable: not a regular expression ({e})") from None
    return settings


# ------------------------------------------------------------------ results arithmetic


def difference(after: Mapping, before: Mapping) -> dict:
    """after − before for every (set, mode, metric) both hold: the recovery / change of a variant, as plain
    floats in the results' units (fractions for accuracies, ROUGE as is)."""
    out: dict = {}
    for set_name, modes in after.items():
        for mode, metrics in modes.items():
            for metric, entry in metrics.items():
                ref = before.get(set_name, {}).get(mode, {}).get(metric)
                if ref is not None:
                    out.setdefault(set_name, {}).setdefault(mode, {})[metric] = float(entry["value"]) - float(ref["value"])
    return out


def select_sets(results: Mapping, sets: Sequence[str]) -> dict:
    """The given sets of a results dict (e.g. the main evaluation's forget set as a diagnostic's baseline)."""
    missing = [s for s in sets if s not in results]
    if missing:
        raise ValueError(f"the baseline results lack the set(s) {missing}; they have {sorted(results)}")
    return {s: results[s] for s in sets}


def _evaluate(model, params, processor, bench, ecfg, sets):
    return evaluate(model, params, processor, bench, dataclasses.replace(ecfg, sets=tuple(sets))).results


def _baseline(model, params, processor, bench, ecfg, sets, baseline):
    if baseline is not None:
        return select_sets(baseline, sets)
    return _evaluate(model, params, processor, bench, ecfg, sets)


# ------------------------------------------------------------------ module reload


def model_family(params) -> str:
    """'llava' or 'qwen2_vl' from the parameter tree's layout; ValueError for anything else."""
    top = set(params)
    if {"vision", "projector", "llm"} <= top:
        return "llava"
    if {"vision", "llm"} <= top and "projector" not in top and "merger" in params["vision"]:
        return "qwen2_vl"
    raise ValueError(f"unknown model family: a parameter tree with top-level {sorted(top)}; known: llava "
                     "(vision, projector, llm) and qwen2_vl (vision with vision/merger, llm)")


def module_of(path: Sequence[str], family: str) -> str:
    """'projector', 'vision' or 'llm' for a parameter path (a tuple of keys) of `family`."""
    if family not in FAMILY_MODULES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILY_MODULES)}")
    for prefix, module in FAMILY_MODULES[family]:
        if tuple(path[: len(prefix)]) == prefix:
            return module
    return "llm"


def swap_modules(unlearned, vanilla, which: str, family: str | None = None) -> dict:
    """`unlearned` with `vanilla`'s `which` module ("projector" | "vision") put back; a new tree.

    family: "llava" | "qwen2_vl" (None: told from the tree, `model_family`). Leaves are shared, never copied
    or modified. ValueError when the two trees' module parameters differ in names or shapes.
    """
    if which not in MODULES:
        raise ValueError(f"which must be one of {MODULES}, got {which!r}")
    family = family or model_family(unlearned)
    flat_u = traverse_util.flatten_dict(unlearned)
    flat_v = traverse_util.flatten_dict(vanilla)
    ours = {k for k in flat_u if module_of(k, family) == which}
    theirs = {k for k in flat_v if module_of(k, family) == which}
    if not ours:
        raise ValueError(f"the {family} parameter tree has no {which} parameters (looked for "
                         f"{[ '/'.join(p) for p, m in FAMILY_MODULES[family] if m == which]})")
    if ours != theirs:
        odd = sorted("/".join(k) for k in ours ^ theirs)[:5]
        raise ValueError(f"unlearned and vanilla {which} parameters differ in names, e.g. {odd}")
    out = dict(flat_u)
    for k in ours:
        if np.shape(flat_v[k]) != np.shape(flat_u[k]):
            raise ValueError(f"{'/'.join(k)}: vanilla shape {np.shape(flat_v[k])} != unlearned {np.shape(flat_u[k])}")
        out[k] = flat_v[k]
    return traverse_util.unflatten_dict(out)


def reload_diagnostic(model, unlearned, vanilla, processor, bench: Benchmark, ecfg, *, baseline: Mapping | None = None,
                      family: str | None = None) -> dict:
    """Forget-set scores of the unlearned model alone and with each vanilla module reloaded.

    baseline: the unlearned model's results from an evaluation with the same `ecfg` (its forget set is
    reused instead of evaluating again). A module the method left exactly as Vanilla's is not scored again: the
    swapped model is the unlearned one, so its results are the unlearned results and its recovery is 0 (listed in
    "unchanged"). Returns {"family", "unlearned", "projector", "vision": results, "recovery": {module: swapped −
    unlearned}, "unchanged": [module, ...]}.
    """
    family = family or model_family(unlearned)
    sets = ("forget",)
    out: dict[str, Any] = {"family": family, "unlearned": _baseline(model, unlearned, processor, bench, ecfg, sets, baseline),
                           "unchanged": []}
    for which in MODULES:
        if module_unchanged(unlearned, vanilla, which, family):  # the swap gives back the unlearned model itself
            out[which] = out["unlearned"]
            out["unchanged"].append(which)
        else:
            out[which] = _evaluate(model, swap_modules(unlearned, vanilla, which, family), processor, bench, ecfg, sets)
    out["recovery"] = {which: difference(out[which], out["unlearned"]) for which in MODULES}
    return out


def module_unchanged(unlearned, vanilla, which: str, family: str | None = None) -> bool:
    """Whether the unlearned model's `which` module holds exactly the vanilla model's values (a method that never
    touched it, e.g. VL-Eraser's FFN-only edit or a LoRA that adapts no projector): reloading it changes nothing."""
    family = family or model_family(unlearned)
    flat_u, flat_v = traverse_util.flatten_dict(unlearned), traverse_util.flatten_dict(vanilla)
    return all(k in flat_v and (flat_u[k] is flat_v[k] or bool(jnp.array_equal(flat_u[k], flat_v[k])))
               for k in flat_u if module_of(k, family) == which)


# ------------------------------------------------------------------ quantization


def quantization_axes(params) -> dict[tuple, int]:
    """path -> the axis reduced into each channel's scale, for every parameter `quantize_params` rounds:
    2-D Dense kernels ([in, out]: one scale per output column, axis 0) and 2-D embedding tables ([rows,
    features]: one scale per row, axis 1 — a row is what a lookup, or a tied head's logit, reads). Norm
    scales, biases, conv kernels and 1-D parameters are left in full precision, as weight-only int8/4-bit
    schemes (bitsandbytes, GPTQ) leave them."""
    axes = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if np.ndim(leaf) == 2 and path[-1] == "kernel":
            axes[path] = 0
        elif np.ndim(leaf) == 2 and path[-1] == "embedding":
            axes[path] = 1
    return axes


def max_level(bits: int) -> int:
    """The symmetric grid's largest integer, 2^(bits−1) − 1: levels −127..127 at int8, −7..7 at 4 bits."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def channel_scales(w, bits: int, axis: int):
    """Symmetric round-to-nearest step per channel: max|w| over `axis` / max_level(bits), in f32 (kept dims)."""
    return jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axis, keepdims=True) / max_level(bits)


@functools.partial(jax.jit, static_argnames=("bits", "axis"))
def _fake_quantize(w, bits: int, axis: int):
    """w rounded to the symmetric integer grid of its channel (levels −qmax..qmax) and scaled back, same dtype."""
    qmax = max_level(bits)
    scale = channel_scales(w, bits, axis)
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / safe), -qmax, qmax)
    return (q * safe).astype(w.dtype)


def quantize_params(params, bits: int) -> dict:
    """Weight-only symmetric per-output-channel round-to-nearest quantization at `bits` (8 or 4), dequantized
    back to the parameters' dtype so the model runs unchanged (see `quantization_axes` for what is
    rounded). A new tree; the input is untouched."""
    max_level(bits)  # checks `bits`
    axes = quantization_axes(params)
    flat = traverse_util.flatten_dict(params)
    out = {k: (_fake_quantize(jnp.asarray(v), bits=bits, axis=axes[k]) if k in axes else v) for k, v in flat.items()}
    return traverse_util.unflatten_dict(out)


def quantization_attack(model, unlearned, processor, bench: Benchmark, ecfg, *, bits: Sequence[int] = QUANT_BITS,
                        baseline: Mapping | None = None) -> dict:
    """Forget and retain scores of the unlearned model in full precision and quantized at each `bits`.

    Returns {"bits", "unlearned", "int8"/"int4": results, "change": {"int8"/"int4": quantized − unlearned}}.
    """
    sets = ("forget", "retain")
    out: dict[str, Any] = {"bits": [int(b) for b in bits],
                           "unlearned": _baseline(model, unlearned, processor, bench, ecfg, sets, baseline)}
    for b in bits:
        out[f"int{b}"] = _evaluate(model, quantize_params(unlearned, b), processor, bench, ecfg, sets)
    out["change"] = {f"int{b}": difference(out[f"int{b}"], out["unlearned"]) for b in bits}
    return out


# ------------------------------------------------------------------ relearning


@dataclasses.dataclass(frozen=True)
class RelearnConfig:
    steps: int = DIAGNOSTICS_DEFAULTS["relearn_steps"]
    learning_rate: float = DIAGNOSTICS_DEFAULTS["relearn_learning_rate"]
    batch_size: int = DIAGNOSTICS_DEFAULTS["relearn_batch_size"]
    max_length: int = 128
    trainable: str = DIAGNOSTICS_DEFAULTS["relearn_trainable"]  # regex over '/'-joined parameter paths
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"RelearnConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"RelearnConfig.learning_rate must be > 0, got {self.learning_rate!r}")


def split_people(person_ids: Sequence[str], seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Seeded halves (A, B) of the people, disjoint and covering them all; A gets the odd one out.

    The split depends only on the set of ids and the seed (not on their order), each half sorted.
    """
    ids = sorted(set(person_ids))
    if len(ids) < 2:
        raise ValueError(f"the relearning attack needs at least 2 forget people to split, got {len(ids)}")
    order = np.random.default_rng([seed, 77]).permutation(len(ids))
    half = len(ids) - len(ids) // 2
    return tuple(sorted(ids[i] for i in order[:half])), tuple(sorted(ids[i] for i in order[half:]))


def restrict_forget(bench: Benchmark, person_ids: Sequence[str]) -> Benchmark:
    """`bench` with only these forget people (evaluation profiles and training rows); other sets unchanged."""
    keep = set(person_ids)
    forget = tuple(p for p in bench.forget if p.person_id in keep)
    missing = keep - {p.person_id for p in forget}
    if missing:
        raise ValueError(f"not forget people of the benchmark: {sorted(missing)}")
    return dataclasses.replace(bench, forget=forget,
                               forget_train=tuple(r for r in bench.forget_train if r.person_id in keep))


def relearn(model, params, processor, rows: Sequence, cfg: RelearnConfig, *, sharding=None) -> tuple[dict, dict]:
    """Fine-tune the parameters matching `cfg.trainable` for `cfg.steps` steps on `rows` (TrainingRows, QA
    prompts, next-token loss on answers, constant lr, no weight decay); returns (new params, info). Every
    other parameter is the input's own leaf; the input is untouched."""
    if not rows:
        raise ValueError("relearn: no training rows")
    data = tokenize(processor, [qa_example(processor, r) for r in rows], cfg.max_length)
    schedule = BatchSchedule([(data, 1.0)], cfg.batch_size, cfg.steps, cfg.seed)
    trainable, frozen = full_training_state(params, cfg.trainable)
    train_cfg = tr.TrainConfig(total_steps=cfg.steps, learning_rate=cfg.learning_rate, schedule="constant",
                               warmup_steps=0, weight_decay=0.0, seed=cfg.seed, log_every=max(cfg.steps // 5, 1),
                               progress=False, description="relearning attack")
    result = tr.train(lm_loss_fn(model), trainable, frozen, schedule, train_cfg, sharding=sharding)
    info = {"seconds": result.seconds, "rows": len(rows), "final_loss": result.history[-1]["loss"],
            "first_loss": result.history[0]["loss"]}
    return tr.merge(result.trainable, frozen["params"]), info


def relearning_attack(model, unlearned, processor, bench: Benchmark, ecfg, cfg: RelearnConfig, *, sharding=None) -> dict:
    """Split the forget people (A, B), relearn on A's forget rows, score forget on A and B before and after.

    Returns {"settings", "people": {"A", "B"}, "train": relearn info, "unlearned"/"relearned": {"A", "B":
    results}, "recovery": {"A", "B": relearned − unlearned}}.
    """
    halves = dict(zip(("A", "B"), split_people([p.person_id for p in bench.forget], cfg.seed)))
    benches = {g: restrict_forget(bench, ids) for g, ids in halves.items()}
    rows = benches["A"].forget_train
    if not rows:
        raise ValueError(f"relearning attack: half A of the forget people {list(halves['A'])} has no training rows")
    sets = ("forget",)
    before = {g: _evaluate(model, unlearned, processor, b, ecfg, sets) for g, b in benches.items()}
    relearned, info = relearn(model, unlearned, processor, rows, cfg, sharding=sharding)
    after = {g: _evaluate(model, relearned, processor, b, ecfg, sets) for g, b in benches.items()}
    return {"settings": dataclasses.asdict(cfg), "people": {g: list(ids) for g, ids in halves.items()}, "train": info,
            "unlearned": before, "relearned": after, "recovery": {g: difference(after[g], before[g]) for g in halves}}
