"""The comparison methods (DESIGN §4) as loss functions on the shared trainer: GA, GD, KL, NPO, MMUnlearner.

Modules: `config` (settings and the registry), `losses`, `mmunlearner` (Fisher, mask, masked gradient),
`schedules` (which steps see forget / retain batches), `runner` (`unlearn_baseline`).

Every loss has the trainer's signature `loss_fn(frozen, trainable, batch, rng) -> (loss, aux)`. A batch is
a dict holding a forget batch, a retain batch or both, each a `data.batching`-style batch (input_ids,
attention_mask, labels, + image inputs):

    {"forget": {...}}            a forget step
    {"retain": {...}}            a retain step
    {"forget": {...}, "retain": {...}}   a combined step (one loss over a forget and a retain batch)

Which of the three a step gets is a *schedule* decision (`step_plan`, `PairedSchedule`), so one loss covers
the reference codes' separate forget/retain steps as well as a combined-loss variant. NLL̄ below is the
token-mean next-token NLL over the batch's answer tokens (transformers' `outputs.loss`, our
`trainer.causal_lm_loss`); nll_i is sequence i's *summed* answer-token NLL (`trainer.token_nll`).

    GA           forget: −NLL̄_f
    GD           forget: −NLL̄_f                         retain: + w_r · NLL̄_r          (paired per step)
    KL           forget: −NLL̄_f                         retain: + w_r · NLL̄_r + w_kl · KL(p_vanilla ‖ p_θ)
    NPO          forget: −(2/β) log σ(β (NLL_θ − NLL_ref))   retain: + w_r · NLL̄_r (paired per step)
    MMUnlearner  forget: −α · NLL̄_f, gradient clipped, then × M   retain: + w_r · NLL̄_r

    KL(p_vanilla ‖ p_θ) = (1/B) Σ_b Σ_t∈tokens Σ_v p_van(v) (log p_van(v) − log p_θ(v))   ("batchmean")
    NPO "batch_mean" (MLLMU-Bench code): NLL = NLL̄ (one scalar per batch);
    NPO "sequence"   (open-unlearning / the NPO paper): NLL = nll_i per sequence, loss averaged over i.
    MMUnlearner: F = mean over batches of (∇ NLL̄_batch)² (diagonal Fisher) on D_f and D_r over the LM
    linears; M = [(F_f + ε) / (F_r + ε) ≥ 1], ε = 1e-15 (so F_r = 0 selects the weight). As in the
    reference, M multiplies the *gradient* on forget steps only, after the gradient of all trainable weights
    was clipped to norm 1 (`clip_then_mask`, the trainer's gradient hook); trainable weights outside the LM
    linears (with the default trainable=".*": embeddings, norms, lm_head, vision tower, projector) get the plain
    ascent gradient, and AdamW's momentum from retain steps still moves unselected weights on a forget step (the
    reference's `p.grad *= mask` before `optimizer.step()` does the same).

What the reference codes do, and where we differ, is written next to each piece and in `BASELINES`.
References: MLLMU-Bench `baselines/{GA,GA_Difference,KL_Minimization,NPO}.py`, MMUnlearner
`baselines/MLLMU_manifold.py` + `data_process/{MLLMU_gen_mask,SFRon}.py`, open-unlearning's NPO.
"""

from .config import (BASELINES, FISHER_SETS, KL_TOKENS, METHOD_NAMES, MLLMU_VARIANTS, NPO_NLL, ORDERS, REFERENCE_RUN,
                     BaselineConfig, baseline_config, reference_run_settings)
from .losses import baseline_loss_fn, kl_to_reference, kl_token_mask, npo_loss
from .mmunlearner import (apply_mask, clip_then_mask, fisher_diagonals, fisher_rows, mask_report, saliency_mask,
                          select_modules)
from .runner import mmunlearner_mask, prepare, run_plan, unlearn_baseline
from .schedules import PairedSchedule, batches_per_epoch, step_plan

__all__ = [
    "BASELINES", "FISHER_SETS", "KL_TOKENS", "METHOD_NAMES", "MLLMU_VARIANTS", "NPO_NLL", "ORDERS", "REFERENCE_RUN",
    "BaselineConfig", "PairedSchedule", "apply_mask", "baseline_config", "baseline_loss_fn", "batches_per_epoch",
    "clip_then_mask", "fisher_diagonals", "fisher_rows", "kl_to_reference", "kl_token_mask", "mask_report",
    "mmunlearner_mask", "npo_loss", "prepare", "reference_run_settings", "run_plan", "saliency_mask", "select_modules",
    "step_plan", "unlearn_baseline",
]
