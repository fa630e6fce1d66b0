"""Membership inference: can an attacker tell the forget people's training QA pairs from those of holdout people
that no model ever trained on? (open-unlearning's MIA metrics, on our holdout people.)

Per attack (LOSS, Min-K%++; scores in `likelihood.membership_scores`) the AUC of separating forget items
(label 1) from holdout items (label 0) with `sklearn.metrics.roc_auc_score`, with a 95% interval from resampling
people on both sides; and privleak = (AUC_model − AUC_oracle) / AUC_oracle, the leak relative to the model
retrained without the forget people (0: like the oracle; positive: the forget people still look like members).
open-unlearning reports MUSE's privleak on 1 − AUC; the sign here follows the plain AUC.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from ..data.batching import qa_example
from ..data.mllmu import TrainingRow
from .likelihood import membership_scores, score_answers

ATTACKS = ("loss", "mink_pp")


def _people_bootstrap_auc(scores: np.ndarray, labels: np.ndarray, people: Sequence[str], resamples: int,
                          seed: int) -> tuple[float, float]:
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (label, person) in enumerate(zip(labels, people)):
        groups[(int(label), person)].append(i)
    members = [v for (label, _), v in sorted(groups.items()) if label == 1]
    others = [v for (label, _), v in sorted(groups.items()) if label == 0]
    rng = np.random.default_rng([seed, 5])
    aucs = []
    for _ in range(resamples):
        rows = [i for g in rng.integers(0, len(members), len(members)) for i in members[g]]
        rows += [i for g in rng.integers(0, len(others), len(others)) for i in others[g]]
        aucs.append(roc_auc_score(labels[rows], scores[rows]))
    low, high = np.quantile(aucs, [0.025, 0.975])
    return float(low), float(high)


def membership_inference(model, params, processor, forget_rows: Sequence[TrainingRow],
                         holdout_rows: Sequence[TrainingRow], *, batch_size: int = 16, max_length: int = 128,
                         k: float = 0.4, resamples: int = 200, seed: int = 0) -> dict:
    """{attack: {"value": AUC, "ci_low", "ci_high", "n", "n_people"}} for forget vs holdout QA pairs."""
    rows = list(forget_rows) + list(holdout_rows)
    if not forget_rows or not holdout_rows:
        raise ValueError("membership inference needs forget rows and holdout rows")
    examples = [qa_example(processor, r) for r in rows]
    scores = membership_scores(score_answers(model, params, processor, examples, batch_size=batch_size,
                                             max_length=max_length, desc="membership inference"), k)
    labels = np.array([1] * len(forget_rows) + [0] * len(holdout_rows))
    people = [f"{'f' if label else 'h'}:{r.person_id}" for label, r in zip(labels, rows)]
    out = {}
    for attack in ATTACKS:
        low, high = _people_bootstrap_auc(scores[attack], labels, people, resamples, seed)
        out[attack] = {"value": float(roc_auc_score(labels, scores[attack])), "ci_low": low, "ci_high": high,
                       "n": len(rows), "n_people": len(set(people)), "n_forget": len(forget_rows),
                       "n_holdout": len(holdout_rows)}
    return out


def privleak(auc: float, oracle_auc: float) -> float:
    """(AUC − AUC_oracle) / AUC_oracle, in percent."""
    return float((auc - oracle_auc) / oracle_auc * 100.0)
