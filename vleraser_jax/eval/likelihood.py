"""Answer likelihoods under a model: the log-probability of each answer token after its prompt.

An example is {"prompt", "answer", "image"} as the training stages use (`data.batching`); the answer tokens are
the ones `collate_for_training` labels (without the end-of-sequence token), so the prompt/answer seam is
exactly the one each model family was trained with. Per answer token the scores hold log p(token), and for
membership inference also the mean μ and variance σ² of log p over the vocabulary at that position (Min-K%++).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

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
