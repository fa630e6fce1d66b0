"""The comparison methods (DESIGN §4) as loss functions on the shared trainer: GA, GD, KL, NPO, MMUnlearner.

Every loss has the trainer's signature `loss_fn(frozen, trainable, batch, rng) -> (loss, aux)`. A batch is
a dict holding a forget batch, a retain batch or both, each a finetune-style batch (input_ids,
attention_mask, labels, + image inputs):

    {"forget": {...}}            a forget step
    {"retain": {...}}            a retain step
    {"forget": {...}, "retain": {...}}   a combined step (one loss over a forget and a retain batch)

Which of the three a step gets is a *schedule* decision (`step_plan`, `PairedSchedule`), so one loss covers
the reference codes' separate forget/retain steps as well as a combined-loss variant. NLL̄ below is the
token-mean next-token NLL over the batch's answer tokens (transformers' `outputs.loss`, our
`trainer.causal_lm_loss`); nll_i is sequence i's *summed* answer-token NLL (`trainer.token_nll`).

    GA           forget: −NLL̄_f
    GD           forget: −NLL̄_f                         retain: + w_r · NLL̄_r
    KL           forget: −NLL̄_f                         retain: + w_r · NLL̄_r + w_kl · KL(p_vanilla ‖ p_θ)
    NPO          forget: −(2/β) log σ(β (NLL_θ − NLL_ref))   retain (only if scheduled): + w_r · NLL̄_r
    MMUnlearner  forget: −α · NLL̄_f, gradient × M on the masked weights   retain: + w_r · NLL̄_r

    KL(p_vanilla ‖ p_θ) = (1/B) Σ_b Σ_t∈tokens Σ_v p_van(v) (log p_van(v) − log p_θ(v))   ("batchmean")
    NPO "batch_mean" (MLLMU-Bench code): NLL = NLL̄ (one scalar per batch);
    NPO "sequence"   (open-unlearning / the NPO paper): NLL = nll_i per sequence, loss averaged over i.
    MMUnlearner: F = mean over batches of (∇ NLL̄_batch)² (diagonal Fisher) on D_f and D_r over the LM
    linears; M = [(F_f + ε) / (F_r + ε) ≥ 1], ε = 1e-15 (so F_r = 0 selects the weight). As in the
    reference, M multiplies the *gradient* (jit-friendly: `mask_gradient`, an identity with a masked VJP)
    on forget steps only; trainable weights outside the LM linears (with the default trainable=".*":
    embeddings, norms, lm_head, vision tower, projector) get the plain ascent gradient, and AdamW's
    momentum from retain steps still moves unselected weights on a forget step (the reference's
    `p.grad *= mask` before `optimizer.step()` does the same). Clipping comes after the mask here, before
    it in the reference.

What the reference codes do, and where we differ, is written next to each piece and in `BASELINES`.
References: MLLMU-Bench `baselines/{GA,GA_Difference,KL_Minimization,NPO}.py`, MMUnlearner
`baselines/MLLMU_manifold.py` + `data_process/{MLLMU_gen_mask,SFRon}.py`, open-unlearning's NPO.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import lora as lora_lib
from . import trainer as tr

METHOD_NAMES = ("ga", "gd", "kl", "npo", "mmunlearner")
# What MLLMU-Bench's PEFT config really adapts: `find_all_linear_names` collects the LM's linear *base names*
# (q/k/v/o/gate/up/down_proj), and PEFT matches target_modules by name suffix, so the CLIP tower's
# q/k/v_proj (same names) get a LoRA too. The default here is DESIGN §4's every-LM-linear `LM_LINEARS`.
MLLMU_PEFT_TARGETS = (r"^(llm/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)"
                      r"|vision/layers_\d+/self_attn/[qkv]_proj)$")
ORDERS = ("forget", "sequential", "interleaved", "paired")
NPO_NLL = ("batch_mean", "sequence")
KL_TOKENS = ("attention", "answer", "all")
FISHER_SETS = ("retain", "mmunlearner")


# ------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """One baseline's method settings. The optimizer basics (batch size, lr, warmup, max_length, seed,
    and `steps` when `epochs` is None) come from the stage config, as for VL-Eraser."""

    method: str = "ga"
    # --- what is trained
    lora: bool = True  # LoRA on `lora_pattern` (MLLMU-Bench: r16 α16 on every LM linear) or full parameters
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_pattern: str = lora_lib.LM_LINEARS
    lora_a_std: float | None = None  # None: 1/rank, PEFT's init_lora_weights="gaussian" (B starts at 0)
    trainable: str = ".*"  # full-parameter mode: regex over '/'-joined parameter paths
    # --- the step schedule
    epochs: float | None = 1.0  # passes over the plan's epoch template; None: exactly stage.steps steps
    order: str = "forget"  # see `step_plan`
    lr_schedule: str = "linear"  # trainer schedule ("linear" decays to 0, as the reference's per-step scheduler)
    max_grad_norm: float | None = None  # the reference codes clip only with accumulation (MMUnlearner: 1.0)
    adam_eps: float = 1e-6  # transformers.AdamW's default, which the reference codes use
    weight_decay: float = 0.0
    length_buckets: int = 1
    # --- loss weights
    forget_weight: float = 1.0  # α on the forget term (MMUnlearner's --forget_alpha)
    retain_weight: float = 1.0
    kl_weight: float = 1.0
    kl_tokens: str = "attention"  # positions the KL sums over: real tokens, answer tokens, or every position
    beta: float = 0.4  # NPO (MLLMU-Bench 0.4, open-unlearning 0.1)
    npo_nll: str = "batch_mean"
    # --- MMUnlearner
    mask_pattern: str = lora_lib.LM_LINEARS  # modules whose weights the saliency mask covers
    mask_threshold: float = 1.0
    mask_eps: float = 1e-15
    fisher_batch_size: int = 2  # MLLMU_gen_mask.py's loaders
    fisher_sets: str = "retain"  # "retain": F on D_f vs D_r; "mmunlearner": F on D_f's image rows vs
    #                               D_r's image rows + every person's text-only rows (gen_mask's language mask)

    def __post_init__(self):
        checks = [("method", METHOD_NAMES), ("order", ORDERS), ("npo_nll", NPO_NLL), ("kl_tokens", KL_TOKENS),
                  ("fisher_sets", FISHER_SETS)]
        for field, allowed in checks:
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.method == "mmunlearner" and self.lora:
            raise ValueError("MMUnlearner masks the model's own weights: set lora=False")
        if self.method == "ga" and self.order != "forget":
            raise ValueError("GA trains on the forget set only (order='forget'); use GD for retain steps")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0 or None, got {self.epochs}")


# name -> (report title, BaselineConfig fields). Sources: MLLMU-Bench GA/GA_Difference/KL_Minimization/NPO.py
# (LoRA r16 α16 on every LM linear, AdamW, no clipping without accumulation, linear lr schedule stepped per
# batch for GA/NPO but once per epoch for GD/KL, i.e. constant within an epoch), MMUnlearner's
# MLLMU_manifold.py (full parameters, clip 1.0, scheduler stepped once per epoch).
BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "ga": ("GA", {"method": "ga", "order": "forget", "lr_schedule": "linear"}),
    "gd": ("GD", {"method": "gd", "order": "sequential", "lr_schedule": "constant"}),
    "kl": ("KL", {"method": "kl", "order": "sequential", "lr_schedule": "constant"}),
    "npo": ("NPO", {"method": "npo", "order": "forget", "lr_schedule": "linear", "beta": 0.4,
                    "npo_nll": "batch_mean"}),
    "mmunlearner": ("MMUnlearner", {"method": "mmunlearner", "order": "interleaved", "lr_schedule": "constant",
                                    "lora": False, "trainable": ".*", "max_grad_norm": 1.0}),
}

# The 7B runs' optimizer basics (StageOneConfig fields): DESIGN §4 (lr 2e-5, batch 4, 1 epoch; the reference
# scripts' max_length 384, no warmup); MMUnlearner's README runs its method at lr 1e-5.
REFERENCE_STAGE = {"batch_size": 4, "learning_rate": 2e-5, "warmup_steps": 0, "max_length": 384}
REFERENCE_STAGE_OVERRIDES = {"mmunlearner": {"learning_rate": 1e-5}}


def baseline_config(name: str, overrides: dict | BaselineConfig | None = None) -> tuple[str, BaselineConfig]:
    """(report title, config): the registry defaults for `name`, with `overrides` (a dict of fields) on top."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    title, defaults = BASELINES[name]
    if isinstance(overrides, BaselineConfig):
        return title, overrides
    fields = {f.name for f in dataclasses.fields(BaselineConfig)}
    unknown = set(overrides or {}) - fields
    if unknown:
        raise ValueError(f"unknown baseline settings {sorted(unknown)}")
    return title, BaselineConfig(**{**defaults, **dict(overrides or {})})


def reference_stage(name: str, **changes):
    """The reference optimizer basics for `name` as a `run.StageOneConfig` (steps unused: epochs decide)."""
    from .run import StageOneConfig

    values = {**REFERENCE_STAGE, **REFERENCE_STAGE_OVERRIDES.get(name, {}), "steps": 0, **changes}
    return StageOneConfig(**values)


# ------------------------------------------------------------------ parametrisation: LoRA or full parameters


def select_modules(params, module_pattern: str) -> tuple[dict, dict]:
    """(params of the modules whose '/'-joined path matches `module_pattern`, the rest). Unlike
    `trainer.partition` the regex sees the module path (`.../mlp/down_proj`), not the parameter's."""
    regex = re.compile(module_pattern)
    flat = traverse_util.flatten_dict(params)
    chosen = {k: v for k, v in flat.items() if regex.search("/".join(k[:-1]))}
    if not chosen:
        raise ValueError(f"module pattern {module_pattern!r} matches no parameter")
    rest = {k: v for k, v in flat.items() if k not in chosen}
    return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


class Adapter:
    """Turns (frozen, trainable) into forward passes.

    LoRA mode: trainable = the LoRA's a/b; frozen = {"params": every model parameter, "lora_scales"}.
    Full mode: trainable = a parameter subtree; frozen = {"params": the rest, "vanilla": the trainable
    subtree's original values (for KL / NPO)}. Either mode may carry frozen["ref"], a complete parameter
    tree for NPO's reference model (default: the vanilla model).
    """

    def __init__(self, model, lora: bool):
        self.model = model
        self.lora = lora

    def _apply(self, variables, inputs):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        return self.model.apply(variables, **inputs).logits

    def logits(self, frozen, trainable, inputs):
        if self.lora:
            variables = {"params": frozen["params"], "lora": tr.merge(trainable, frozen["lora_scales"])}
        else:
            variables = {"params": tr.merge(trainable, frozen["params"])}
        return self._apply(variables, inputs)

    def vanilla_params(self, frozen):
        return frozen["params"] if self.lora else tr.merge(frozen["vanilla"], frozen["params"])

    def vanilla_logits(self, frozen, inputs):
        return jax.lax.stop_gradient(self._apply({"params": self.vanilla_params(frozen)}, inputs))

    def reference_logits(self, frozen, inputs):
        params = frozen["ref"] if frozen.get("ref") is not None else self.vanilla_params(frozen)
        return jax.lax.stop_gradient(self._apply({"params": params}, inputs))

    def unlearned_params(self, frozen, trainable):
        """The plain parameter tree after training: LoRA merged into the kernels, or the trained subtree."""
        if self.lora:
            return lora_lib.merge(frozen["params"], tr.merge(trainable, frozen["lora_scales"]))
        return tr.merge(trainable, frozen["params"])


def init_lora(params, cfg: BaselineConfig, rng) -> dict:
    """LoRA on `cfg.lora_pattern` with PEFT's gaussian init: a ~ N(0, (1/r)²) (or `lora_a_std`), b = 0.
    The same tree layout as `lora.init`; drawn with numpy, seeded by the key (no per-shape compiles)."""
    flat = traverse_util.flatten_dict(params)
    paths = lora_lib.target_paths(params, cfg.lora_pattern)
    std = cfg.lora_a_std if cfg.lora_a_std is not None else 1.0 / cfg.lora_rank
    r = cfg.lora_rank
    seed = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().astype(np.uint64).tolist())
    out = {}
    for path in paths:
        f, d = flat[tuple(path.split("/")) + ("kernel",)].shape
        prefix = tuple(path.split("/"))
        out[prefix + ("a",)] = jnp.asarray(std * seed.standard_normal((f, r)), jnp.float32)
        out[prefix + ("b",)] = jnp.asarray(np.zeros((r, d), np.float32))
        out[prefix + ("scale",)] = jnp.asarray(cfg.lora_alpha / r, jnp.float32)
    return traverse_util.unflatten_dict(out)


def prepare(model, params, cfg: BaselineConfig, rng=None, ref_params=None, mask=None):
    """(adapter, trainable, frozen) for `cfg`. ref_params: NPO's reference model (None: vanilla).
    mask: MMUnlearner's saliency mask (a tree over parameter paths), stored as frozen["mask"]."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    adapter = Adapter(model, cfg.lora)
    if cfg.lora:
        trainable, scales = lora_lib.split_trainable(init_lora(params, cfg, rng))
        frozen = {"params": params, "lora_scales": scales}
    else:
        trainable, rest = tr.partition(params, cfg.trainable)
        frozen = {"params": rest}
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
        valid = batch["labels"][:, 1:] != tr.IGNORE_INDEX
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


@jax.custom_vjp
def mask_gradient(x, mask):
    """Identity in the forward pass; the backward pass keeps the gradient only where `mask` is True."""
    return x


def _mask_gradient_fwd(x, mask):
    return x, mask


def _mask_gradient_bwd(mask, g):
    return jnp.where(mask, g, jnp.zeros_like(g)), None


mask_gradient.defvjp(_mask_gradient_fwd, _mask_gradient_bwd)


def apply_gradient_mask(trainable, mask):
    """`trainable` with `mask_gradient` on every leaf the mask covers; other leaves pass untouched."""
    flat_mask = traverse_util.flatten_dict(mask)
    flat = traverse_util.flatten_dict(trainable)
    return traverse_util.unflatten_dict(
        {k: (mask_gradient(v, flat_mask[k]) if k in flat_mask else v) for k, v in flat.items()})


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
            params = trainable
            if method == "mmunlearner":
                params = apply_gradient_mask(trainable, frozen["mask"])
            logits = adapter.logits(frozen, params, b)
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


def _loss(method: str, adapter, **fields):
    return baseline_loss_fn(adapter, BaselineConfig(method=method, lora=adapter.lora, **fields))


def ga_loss_fn(adapter: Adapter) -> Callable:
    """GA: −NLL̄_f."""
    return _loss("ga", adapter)


def gd_loss_fn(adapter: Adapter, retain_weight: float = 1.0) -> Callable:
    """GD: −NLL̄_f on forget batches, + w_r NLL̄_r on retain batches (both when the batch holds both)."""
    return _loss("gd", adapter, retain_weight=retain_weight)


def kl_loss_fn(adapter: Adapter, kl_weight: float = 1.0, retain_weight: float = 1.0,
               kl_tokens: str = "attention") -> Callable:
    """KL: −NLL̄_f on forget batches; w_r NLL̄_r + w_kl KL(p_vanilla ‖ p_θ) on retain batches."""
    return _loss("kl", adapter, kl_weight=kl_weight, retain_weight=retain_weight, kl_tokens=kl_tokens)


def npo_loss_fn(adapter: Adapter, beta: float = 0.4, reduction: str = "batch_mean",
                retain_weight: float = 1.0) -> Callable:
    """NPO on forget batches (reference forward in the loss, no gradient); w_r NLL̄_r on any retain batch."""
    return _loss("npo", adapter, beta=beta, npo_nll=reduction, retain_weight=retain_weight)


def mmunlearner_loss_fn(adapter: Adapter, forget_alpha: float = 1.0, retain_weight: float = 1.0) -> Callable:
    """MMUnlearner: −α NLL̄_f with the gradient masked by frozen["mask"]; + w_r NLL̄_r on retain batches."""
    return _loss("mmunlearner", adapter, forget_weight=forget_alpha, retain_weight=retain_weight)


# ------------------------------------------------------------------ MMUnlearner: Fisher and mask


def fisher_diagonals(model, params, batch_sets: Sequence[Sequence[dict]],
                     module_pattern: str = lora_lib.LM_LINEARS, sharding=None) -> list[dict]:
    """For each list of batches: the mean over its batches of the squared gradient of the batch's token-mean
    NLL, for the parameters of the modules matching `module_pattern` (SFRon.py's `Mask_Our`:
    Σ_b g_b² / n_batches; the sign of its −loss does not matter). f32 trees. One compiled program per
    batch shape, shared by the sets. sharding: a `parallel.Sharder` (the sums are laid out like the
    parameters and donated from step to step)."""
    selected, rest = select_modules(params, module_pattern)

    def accumulate_fn(acc, sel, rest, batch):  # parameters as arguments: never baked in as constants
        def nll(s):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model.apply({"params": tr.merge(s, rest)}, **inputs).logits
            return tr.causal_lm_loss(logits, batch["labels"])

        g = jax.grad(nll)(sel)
        return jax.tree_util.tree_map(lambda a, x: a + jnp.square(x.astype(jnp.float32)), acc, g)

    if sharding is None:
        accumulate = jax.jit(accumulate_fn)
    else:
        accumulate = sharding.jit(
            accumulate_fn,
            lambda acc, sel, rest, batch: (sharding.tree(acc), sharding.tree(sel), sharding.tree(rest),
                                           sharding.batch(batch)),
            lambda acc, sel, rest, batch: sharding.tree(acc),
            donate_argnums=(0,),
        )

    out = []
    for batches in batch_sets:
        if not batches:
            raise ValueError("fisher_diagonals: a set has no batches")
        shapes = [x.shape for x in jax.tree_util.tree_leaves(selected)]
        zeros = lambda: jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(selected), [jnp.zeros(shape, jnp.float32) for shape in shapes])
        # sharded: each device creates only its own shard of the sums
        acc = zeros() if sharding is None else jax.jit(zeros, out_shardings=sharding.tree(selected))()
        for batch in batches:
            acc = accumulate(acc, selected, rest, batch)
        out.append(jax.tree_util.tree_map(lambda a, n=len(batches): a / n, acc))
    return out


def fisher_diagonal(model, params, batches: Sequence[dict], module_pattern: str = lora_lib.LM_LINEARS) -> dict:
    """`fisher_diagonals` for one set of batches."""
    return fisher_diagonals(model, params, [batches], module_pattern)[0]


def saliency_mask(fisher_forget, fisher_retain, threshold: float = 1.0, eps: float = 1e-15):
    """M = [(F_f + ε) / (F_r + ε) ≥ threshold] per weight, as SFRon.py. ε keeps F_r = 0 finite: the ratio is then
    (F_f + ε)/ε ≥ 1, so at threshold 1 such a weight is always selected (F_f = F_r = 0 included)."""
    return jax.tree_util.tree_map(lambda f, r: (f + eps) / (r + eps) >= threshold, fisher_forget, fisher_retain)


def mask_report(mask) -> dict:
    """Selected fraction per module and overall."""
    per = {"/".join(k): float(np.mean(np.asarray(v))) for k, v in traverse_util.flatten_dict(mask).items()}
    total = sum(int(np.asarray(v).size) for v in jax.tree_util.tree_leaves(mask))
    chosen = sum(int(np.asarray(v).sum()) for v in jax.tree_util.tree_leaves(mask))
    return {"selected_fraction": chosen / max(total, 1), "selected": chosen, "total": total, "per_parameter": per}


def fisher_rows(forget_rows, retain_rows, full_rows, mode: str = "retain"):
    """(D_f rows, D_r rows) for the Fisher. "retain": the training splits; "mmunlearner": MLLMU_gen_mask.py's
    language mask, image rows of D_f against image rows of D_r plus every person's text-only rows."""
    if mode == "retain":
        return list(forget_rows), list(retain_rows)
    if mode == "mmunlearner":
        return ([r for r in forget_rows if r.image is not None],
                [r for r in retain_rows if r.image is not None] + [r for r in full_rows if r.image is None])
    raise ValueError(f"fisher_sets must be one of {FISHER_SETS}, got {mode!r}")


def group_lengths(*datas) -> dict[bool, int]:
    """{has_image: the longest real row of that kind over `datas`, rounded up to 8} (`epoch_batches`)."""
    out: dict[bool, int] = {}
    for data in datas:
        for has_image in (True, False):
            rows = (data.image_index >= 0) == has_image
            if rows.any():
                length = min(int(-(-data.attention_mask[rows].sum(1).max() // 8) * 8), data.input_ids.shape[1])
                out[has_image] = max(out.get(has_image, 0), length)
    return out


def epoch_batches(data, batch_size: int, seed: int = 0, lengths: dict[bool, int] | None = None) -> list[dict]:
    """Every row of a `finetune.Tokenized` exactly once, in seeded order, image and text rows apart; each
    group cut to one length (`lengths[has_image]`, default `group_lengths(data)`) so it compiles once. A
    short last batch is filled with copies of its first row whose labels are all ignored: they change no
    NLL, so no gradient."""
    lengths = {**group_lengths(data), **(lengths or {})}
    out = []
    rng = np.random.default_rng([seed, 11])
    for has_image in (True, False):
        rows = np.flatnonzero((data.image_index >= 0) == has_image)
        if not len(rows):
            continue
        rows = rng.permutation(rows)
        length = lengths[has_image]
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            fill = batch_size - len(part)
            idx = np.concatenate([part, np.repeat(part[:1], fill)])
            labels = data.labels[idx, :length].copy()
            labels[len(part):] = tr.IGNORE_INDEX
            batch = {"input_ids": data.input_ids[idx, :length], "attention_mask": data.attention_mask[idx, :length],
                     "labels": labels}
            if has_image:
                batch.update(data.image_inputs(idx))
            out.append(batch)
    return out


# ------------------------------------------------------------------ schedules


def batches_per_epoch(rows: int, batch_size: int) -> int:
    """A DataLoader's len without drop_last."""
    return -(-rows // batch_size)


def step_plan(order: str, n_forget: int, n_retain: int = 0, *, epochs: float | None = 1.0,
              steps: int | None = None) -> np.ndarray:
    """[S, 2] ints: per step, the index of its forget batch and of its retain batch (−1: none), each a
    running count of that stream's batches. n_forget / n_retain: batches per epoch.

    One epoch's template, by `order`:
      "forget":      F × n_f                                       (GA, NPO)
      "sequential":  F × n_f, then R × n_r                         (MLLMU-Bench GD and KL: a forget pass,
                                                                   then a retain pass, separate steps)
      "interleaved": for it in range(n_r): F first if it % k == 0 (at most n_f of them); then R,
                     k = max(n_r // n_f, 1)                        (MMUnlearner's loop; n_r = n_f alternates)
      "paired":      FR × n_f                                      (one combined loss per step)
    epochs: repeat the template (a fraction truncates it); steps (when epochs is None): cycle it to exactly
    that many steps.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if n_forget < 1:
        raise ValueError("the plan needs at least one forget batch")
    if order in ("sequential", "interleaved", "paired") and n_retain < 1:
        raise ValueError(f"order {order!r} needs retain batches")
    if order == "forget":
        template = ["F"] * n_forget
    elif order == "sequential":
        template = ["F"] * n_forget + ["R"] * n_retain
    elif order == "paired":
        template = ["FR"] * n_forget
    else:
        every, used, template = max(n_retain // n_forget, 1), 0, []
        for it in range(n_retain):
            if it % every == 0 and used < n_forget:
                template.append("F")
                used += 1
            template.append("R")
    if epochs is not None:
        total = max(int(round(epochs * len(template))), 1)
    elif steps is not None and steps > 0:
        total = steps
    else:
        raise ValueError("give epochs, or steps > 0")
    kinds = [template[i % len(template)] for i in range(total)]
    plan = np.full((total, 2), -1, np.int64)
    f = r = 0
    for i, kind in enumerate(kinds):
        if "F" in kind:
            plan[i, 0], f = f, f + 1
        if "R" in kind:
            plan[i, 1], r = r, r + 1
    return plan


class PairedSchedule:
    """`batch(step)` -> {"forget": forget(i)} / {"retain": retain(j)} / both, by `plan` (`step_plan`);
    forget/retain are pure functions of their own batch count (e.g. `finetune.BatchSchedule`s)."""

    def __init__(self, plan: np.ndarray, forget: Callable[[int], dict] | None, retain: Callable[[int], dict] | None):
        self.plan = np.asarray(plan)
        if (self.plan[:, 0] >= 0).any() and forget is None:
            raise ValueError("the plan has forget steps but no forget batches")
        if (self.plan[:, 1] >= 0).any() and retain is None:
            raise ValueError("the plan has retain steps but no retain batches")
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def forget_steps(self) -> int:
        return int((self.plan[:, 0] >= 0).sum())

    @property
    def retain_steps(self) -> int:
        return int((self.plan[:, 1] >= 0).sum())

    def __call__(self, step: int) -> dict:
        f, r = (int(x) for x in self.plan[step])
        out = {}
        if f >= 0:
            out["forget"] = self.forget(f)
        if r >= 0:
            out["retain"] = self.retain(r)
        return out


# ------------------------------------------------------------------ the runner


def unlearn_baseline(
    model,
    params,
    processor,
    bench,
    name: str,
    settings: BaselineConfig | dict | None = None,
    stage_cfg=None,
    out_dir: Path | None = None,
    *,
    source_dir: Path | None = None,
    ref_params=None,
    forget_rows: Sequence | None = None,
    retain_rows: Sequence | None = None,
    progress: bool = True,
    log=print,
    sharding=None,
) -> tuple[Any, dict]:
    """Run baseline `name` on `bench`; returns (unlearned params, info with timings and history).

    settings: a BaselineConfig, or a dict of fields over the registry defaults (None: the defaults).
    stage_cfg: a `run.StageOneConfig` (batch_size, learning_rate, warmup_steps, max_length, seed; `steps`
    when settings.epochs is None); None: `reference_stage(name)`. ref_params: NPO's reference model (e.g. a
    retain-only fine-tune; None: the vanilla `params`). The returned parameters have the input's
    structure (a LoRA is merged into the kernels); with `out_dir` they are exported with `save_pretrained`.
    sharding: a `parallel.Sharder`: Fisher statistics and every training step run sharded over its mesh.
    """
    from ..finetune import BatchSchedule, qa_example, tokenize
    from ..checkpoints import save_pretrained

    t_start = time.perf_counter()
    title, cfg = baseline_config(name, settings)
    stage = stage_cfg if stage_cfg is not None else reference_stage(name)
    info: dict[str, Any] = {"method": name, "title": title, "config": dataclasses.asdict(cfg),
                            "stage": dataclasses.asdict(stage)}
    f_rows = list(forget_rows if forget_rows is not None else bench.forget_train)
    r_rows = list(retain_rows if retain_rows is not None else bench.retain_train)
    if not f_rows:
        raise ValueError("the forget set has no training rows")
    needs_retain = cfg.order != "forget"
    if needs_retain and not r_rows:
        raise ValueError(f"{title} needs retain rows")

    t0 = time.perf_counter()
    f_data = tokenize(processor, [qa_example(processor, r) for r in f_rows], stage.max_length)
    r_data = tokenize(processor, [qa_example(processor, r) for r in r_rows], stage.max_length) if needs_retain else None
    plan = step_plan(cfg.order, batches_per_epoch(len(f_rows), stage.batch_size),
                     batches_per_epoch(len(r_rows), stage.batch_size) if needs_retain else 0,
                     epochs=cfg.epochs, steps=stage.steps)
    n_f, n_r = int((plan[:, 0] >= 0).sum()), int((plan[:, 1] >= 0).sum())
    f_sched = BatchSchedule([(f_data, 1.0)], stage.batch_size, n_f, stage.seed, cfg.length_buckets) if n_f else None
    r_sched = BatchSchedule([(r_data, 1.0)], stage.batch_size, n_r, stage.seed + 1, cfg.length_buckets) if n_r else None
    batch_fn = PairedSchedule(plan, f_sched, r_sched)
    info["data_seconds"] = time.perf_counter() - t0
    info["steps"], info["forget_steps"], info["retain_steps"] = len(plan), n_f, n_r

    mask = None
    if cfg.method == "mmunlearner":
        t0 = time.perf_counter()
        full_rows = list(getattr(bench, "full_train", ()) or ())
        fisher_f_rows, fisher_r_rows = fisher_rows(f_rows, r_rows, full_rows, cfg.fisher_sets)
        if cfg.fisher_sets == "retain":  # the training sets themselves, already tokenized
            datas = [f_data, r_data]
        else:
            datas = [tokenize(processor, [qa_example(processor, r) for r in rows], stage.max_length)
                     for rows in (fisher_f_rows, fisher_r_rows)]
        lengths = group_lengths(*datas)  # both sets share the compiled programs
        fisher = fisher_diagonals(model, params, [epoch_batches(d, cfg.fisher_batch_size, stage.seed, lengths)
                                                  for d in datas], cfg.mask_pattern, sharding)
        mask = saliency_mask(fisher[0], fisher[1], cfg.mask_threshold, cfg.mask_eps)
        jax.block_until_ready(mask)
        info["mask_seconds"] = time.perf_counter() - t0
        report = mask_report(mask)
        info["mask_report"] = {k: v for k, v in report.items() if k != "per_parameter"}
        log(f"{title}: saliency mask from {len(fisher_f_rows)} forget / {len(fisher_r_rows)} retain rows in "
            f"{info['mask_seconds']:.1f} s, {report['selected_fraction']:.1%} of the masked weights selected")
        del fisher

    adapter, trainable, frozen = prepare(model, params, cfg, jax.random.PRNGKey(stage.seed), ref_params, mask)
    train_cfg = tr.TrainConfig(
        total_steps=len(plan), learning_rate=stage.learning_rate, schedule=cfg.lr_schedule,
        warmup_steps=stage.warmup_steps, end_lr_factor=0.0, weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
        max_grad_norm=cfg.max_grad_norm, seed=stage.seed, log_every=max(len(plan) // 20, 1),
        progress=progress, description=title,
    )
    result = tr.train(baseline_loss_fn(adapter, cfg), trainable, frozen, batch_fn, train_cfg, sharding=sharding)
    info["train_seconds"] = result.seconds
    info["history"] = result.history
    t0 = time.perf_counter()
    unlearned = adapter.unlearned_params(frozen, result.trainable)
    jax.block_until_ready(unlearned)
    info["merge_seconds"] = time.perf_counter() - t0
    info["total_seconds"] = time.perf_counter() - t_start
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_pretrained(unlearned, model.config, out_dir / "model", copy_files_from=source_dir)
        (out_dir / "info.json").write_text(json.dumps(info, indent=2, default=str))
    last = result.history[-1] if result.history else {}
    log(f"{title}: {len(plan)} steps ({n_f} forget, {n_r} retain) in {result.seconds:.1f} s; last "
        + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k in ("loss", "forget_nll", "retain_nll", "kl")))
    return unlearned, info
