"""The baselines' settings (`BaselineConfig`), the registry of the five methods with their reference-code
defaults, and the 7B runs' reference optimizer settings."""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import lora as lora_lib
from ..trainer import RunSettings


METHOD_NAMES = ("ga", "gd", "kl", "npo", "mmunlearner")
# What MLLMU-Bench's PEFT config really adapts: `find_all_linear_names` collects the LM's linear *base names*
# (q/k/v/o/gate/up/down_proj), and PEFT matches target_modules by name suffix, so the CLIP tower's
# q/k/v_proj (same names) get a LoRA too. The default here is DESIGN §4's every-LM-linear `LM_LINEARS`.


ORDERS = ("forget", "sequential", "interleaved", "paired")
NPO_NLL = ("batch_mean", "sequence")
KL_TOKENS = ("attention", "answer", "all")
FISHER_SETS = ("retain", "mmunlearner")


# ------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """One baseline's method settings. The optimizer settings (batch size, lr, warmup, max_length, seed,
    and `steps` when `epochs` is None) come from the run's `RunSettings`, as for VL-Eraser."""

    method: str = "ga"
    # --- what is trained
    lora: bool = True  # LoRA on `lora_pattern` (MLLMU-Bench: r16 α16) or full parameters
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_pattern: str = lora_lib.MLLMU_PEFT_TARGETS  # every LM linear and the vision tower's attention q/k/v
    lora_a_std: float | None = None  # None: 1/rank, PEFT's init_lora_weights="gaussian" (B starts at 0)
    trainable: str = ".*"  # full-parameter mode: regex over '/'-joined parameter paths
    # --- the step schedule
    epochs: float | None = 1.0  # passes over the plan's epoch template; None: exactly settings.steps steps
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
    beta: float = 0.1  # NPO (open-unlearning 0.1, MLLMU-Bench 0.4)
    npo_nll: str = "sequence"
    # --- MMUnlearner
    mask_pattern: str = lora_lib.LM_LINEARS  # modules whose weights the saliency mask covers
    mask_threshold: float = 1.0
    mask_eps: float = 1e-15
    fisher_batch_size: int = 2  # MLLMU_gen_mask.py's loaders
    fisher_sets: str = "mmunlearner"  # "mmunlearner": F on D_f's image rows vs D_r's image rows + every
    #                                    person's text-only rows (MLLMU_gen_mask.py's language mask); "retain":
    #                                    F on the training splits D_f vs D_r

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


# name -> (report title, BaselineConfig fields): each method as its authors define it.
# GD and KL: one combined loss per step on a paired forget and retain batch (open-unlearning's GradDiff:
# −NLL̄_f + NLL̄_r; KL adds KL(p_vanilla ‖ p_θ) on the retain batch). NPO: the NPO paper's per-sequence
# log-likelihood ratio with β 0.1 and a retain NLL term on paired batches (open-unlearning's NPO).
# MMUnlearner: MLLMU_manifold.py (full parameters, a forget step every len(D_r)/len(D_f) retain steps, clip
# 1.0 then mask, scheduler stepped once per epoch) with MLLMU_gen_mask.py's preserve sets.
# LoRA r16 α16 on MLLMU-Bench's PEFT targets, AdamW, linear decay.
BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "ga": ("GA", {"method": "ga", "order": "forget", "lr_schedule": "linear"}),
    "gd": ("GD", {"method": "gd", "order": "paired", "lr_schedule": "linear"}),
    "kl": ("KL", {"method": "kl", "order": "paired", "lr_schedule": "linear"}),
    "npo": ("NPO", {"method": "npo", "order": "paired", "lr_schedule": "linear", "beta": 0.1, "npo_nll": "sequence"}),
    "mmunlearner": ("MMUnlearner", {"method": "mmunlearner", "order": "interleaved", "lr_schedule": "constant",
                                    "lora": False, "trainable": ".*", "max_grad_norm": 1.0,
                                    "fisher_sets": "mmunlearner"}),
}
# MLLMU-Bench's own code where it differs (GA_Difference.py, KL_Minimization.py, NPO.py): GD and KL run a forget
# pass, then a retain pass, as separate steps with the scheduler stepped once per epoch; NPO is forget-only
# with the batch's token-mean NLL and β 0.4. `baseline_config(name, variant="mllmu")`.
MLLMU_VARIANTS: dict[str, dict[str, Any]] = {
    "gd": {"order": "sequential", "lr_schedule": "constant"},
    "kl": {"order": "sequential", "lr_schedule": "constant"},
    "npo": {"order": "forget", "beta": 0.4, "npo_nll": "batch_mean"},
}
VARIANTS = ("authors", "mllmu")

# The 7B runs' optimizer settings (RunSettings fields): DESIGN §4 (lr 2e-5, batch 4, 1 epoch; the reference
# scripts' max_length 384, no warmup); MMUnlearner's README runs its method at lr 1e-5.
REFERENCE_RUN = {"batch_size": 4, "learning_rate": 2e-5, "warmup_steps": 0, "max_length": 384}
REFERENCE_RUN_OVERRIDES = {"mmunlearner": {"learning_rate": 1e-5}}


def baseline_config(name: str, overrides: dict | BaselineConfig | None = None, variant: str = "authors"
                    ) -> tuple[str, BaselineConfig]:
    """(report title, config): the registry defaults for `name` (`variant` "mllmu": MLLMU-Bench's code where it
    differs from the authors'), with `overrides` (a dict of fields) on top."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    title, defaults = BASELINES[name]
    if isinstance(overrides, BaselineConfig):
        return title, overrides
    fields = {f.name for f in dataclasses.fields(BaselineConfig)}
    unknown = set(overrides or {}) - fields
    if unknown:
        raise ValueError(f"unknown baseline settings {sorted(unknown)}")
    variant_fields = MLLMU_VARIANTS.get(name, {}) if variant == "mllmu" else {}
    return title, BaselineConfig(**{**defaults, **variant_fields, **dict(overrides or {})})


def reference_run_settings(name: str, **changes) -> RunSettings:
    """The reference optimizer settings for `name` (steps unused: epochs decide)."""
    values = {**REFERENCE_RUN, **REFERENCE_RUN_OVERRIDES.get(name, {}), "steps": 0, **changes}
    return RunSettings(**values)
