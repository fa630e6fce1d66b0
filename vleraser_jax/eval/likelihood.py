"""Answer likelihoods under a model: the log-probability of each answer token after its prompt.

An example is {"prompt", "answer", "image"} as the training stages use (`data.batching`); the answer tokens are
the ones `collate_for_training` labels (without the end-of-sequence token), so the prompt/answer seam is
exactly the one each model family was trained with. Per answer token the scores hold log p(token), and for
membership inference also the mean μ and variance σ² of log p over the vocabulary at that position (Min-K%++).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..data.batching import indexed_batches, rows_by_group, tokenize
from ..processing import IGNORE_INDEX
from ..unlearn.adapter import model_inputs


@dataclasses.dataclass(frozen=True)
class AnswerScores:
    """Per answer token: log p(token | everything before it), and the vocabulary's mean / variance of log p."""

    logprob: np.ndarray  # [n answer tokens]
    vocab_mean: np.ndarray
    vocab_var: np.ndarray

    @property
    def total(self) -> float:
        return float(self.logprob.sum())

    @property
    def mean(self) -> float:
        """Mean log-probability per token: log of the geometric-mean per-token probability."""
        return float(self.logprob.mean()) if len(self.logprob) else float("nan")


@functools.partial(jax.jit, static_argnames=("model",))
def _token_statistics(model, params, batch):
    """[B, T] next-token log p of the labelled tokens and the vocabulary mean / variance of log p (f32);
    positions are aligned with `labels` (position t scores labels[t] given tokens < t)."""
    logits = model.apply({"params": params}, **model_inputs(batch)).logits[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = batch["labels"][:, 1:]
    picked = jnp.take_along_axis(logp, jnp.where(targets == IGNORE_INDEX, 0, targets)[..., None], axis=-1)[..., 0]
    p = jnp.exp(logp)
    mean = (p * logp).sum(-1)
    var = (p * jnp.square(logp)).sum(-1) - jnp.square(mean)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))
    return pad(picked), pad(mean), pad(var)


def score_answers(model, params, processor, examples: Sequence[dict], *, batch_size: int = 16,
                  max_length: int = 128, desc: str = "answer likelihoods") -> list[AnswerScores]:
    """`AnswerScores` of every example's answer, in order. Rows with and without an image are batched apart
    in fixed shapes (one compiled program per kind)."""
    if not examples:
        return []
    data = tokenize(processor, list(examples), max_length, append_eos=False)
    batches = indexed_batches(data, batch_size, rows_by_group(data))
    out: list[AnswerScores | None] = [None] * len(examples)
    for rows, batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        picked, mean, var = (np.asarray(x) for x in _token_statistics(model, params, batch))
        for k, row in enumerate(rows):
            answer = batch["labels"][k] != IGNORE_INDEX
            out[row] = AnswerScores(picked[k][answer], mean[k][answer], var[k][answer])
    return out


# ------------------------------------------------------------------ multiple choice by option likelihood


def option_examples(prompt: str, image: bytes | None, options: Mapping[str, str]) -> list[dict]:
    """One scoring example per option letter (in letter order): the option's text as the answer to `prompt`."""
    return [{"prompt": prompt, "answer": text, "image": image} for _, text in sorted(options.items())]


def option_choice(scores: Sequence[AnswerScores], options: Mapping[str, str], answer: str) -> dict:
    """lm-evaluation-harness's multiple-choice scores from each option's `AnswerScores` (letter order):
    acc (the highest summed log-likelihood is the correct option), acc_norm (the same per character of the
    option text), and TOFU's truth ratio adapted to four options: the geometric-mean per-token probability of
    the distractors, averaged in log space, over the correct option's."""
    letters = sorted(options)
    total = np.array([s.total for s in scores])
    per_char = total / np.array([max(len(options[k]), 1) for k in letters])
    per_token = np.array([s.mean for s in scores])
    correct = letters.index(answer)
    wrong = np.delete(per_token, correct)
    return {"option_acc": float(int(np.argmax(total)) == correct),
            "option_acc_norm": float(int(np.argmax(per_char)) == correct),
            "truth_ratio": float(np.exp(wrong.mean() - per_token[correct]))}


# ------------------------------------------------------------------ membership inference


def membership_scores(scores: Sequence[AnswerScores], k: float = 0.4) -> dict[str, np.ndarray]:
    """Per example, how member-like its answer looks (higher: more likely trained on):
    "loss": −(mean answer-token NLL) (the LOSS attack); "mink_pp": Min-K%++, the mean of the lowest k-fraction
    of z_t = (log p(x_t) − μ_t) / σ_t, μ_t and σ_t² the mean and variance of log p under the model's own
    next-token distribution (Zhang et al. 2024; open-unlearning's k = 0.4)."""
    loss, mink = [], []
    for s in scores:
        loss.append(s.mean)
        z = (s.logprob - s.vocab_mean) / np.sqrt(np.maximum(s.vocab_var, 1e-6))
        lowest = np.sort(z)[: max(1, int(len(z) * k))]
        mink.append(float(lowest.mean()) if len(z) else float("nan"))
    return {"loss": np.asarray(loss), "mink_pp": np.asarray(mink)}
