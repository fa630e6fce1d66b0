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
from ..models.configs import compute_dtype
from ..models.llama import init_cache
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


def _vocab_statistics(logits, targets):
    """log p of `targets` under `logits` [..., V] and the vocabulary's mean / variance of log p (f32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    p = jnp.exp(logp)
    mean = (p * logp).sum(-1)
    return picked, mean, (p * jnp.square(logp)).sum(-1) - jnp.square(mean)


@functools.partial(jax.jit, static_argnames=("model",))
def _token_statistics(model, params, batch):
    """[B, T] next-token log p of the labelled tokens and the vocabulary mean / variance of log p (f32);
    positions are aligned with `labels` (position t scores labels[t] given tokens < t)."""
    logits = model.apply({"params": params}, **model_inputs(batch)).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    picked, mean, var = _vocab_statistics(logits, jnp.where(targets == IGNORE_INDEX, 0, targets))
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


@functools.partial(jax.jit, static_argnames=("model",))
def _option_statistics(model, params, prompt, option_ids, option_mask):
    """Every option of a batch of items scored after one pass over their shared prompt.

    prompt: {"input_ids", "attention_mask"} [B, P] left-padded (+ image inputs); option_ids / option_mask [B, K, O]
    (right-padded). The prompt fills a KV cache once; each option then runs as one cached chunk from slot P.
    Returns (log p, vocabulary mean, variance), each [B, K, O]: position t scores option token t."""
    b, p = prompt["input_ids"].shape
    o = option_ids.shape[2]
    cache = init_cache(model.config.text, b, p + o, compute_dtype(model.config.dtype))
    mask = jnp.concatenate([prompt["attention_mask"], jnp.zeros((b, o), jnp.int32)], axis=1)
    images = {k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask")}
    out = model.apply({"params": params}, input_ids=prompt["input_ids"], attention_mask=mask, cache=cache,
                      cache_index=0, logits_to_keep=1, **images)  # the prompt's last position scores token 0
    step = {} if getattr(out, "rope_deltas", None) is None else {"rope_deltas": out.rope_deltas}
    per_option = []
    for k in range(option_ids.shape[1]):  # K is static (options per item): one chunk pass per option
        ids = option_ids[:, k]
        chunk = model.apply({"params": params}, input_ids=ids,
                            attention_mask=jnp.concatenate([prompt["attention_mask"], option_mask[:, k]], axis=1),
                            cache=out.cache, cache_index=p, **step).logits
        # token 0 is predicted by the prompt's last position, token t by the chunk's position t − 1
        logits = jnp.concatenate([out.logits[:, -1:], chunk[:, :-1]], axis=1)
        per_option.append(_vocab_statistics(logits, ids))
    return tuple(jnp.stack([s[i] for s in per_option], axis=1) for i in range(3))


def _item_rows(data, start: int, k: int) -> tuple[int, list[int]]:
    """(prompt length, option lengths) of the k tokenized rows of one item, checking they share the prompt."""
    answer = data.labels[start:start + k] != IGNORE_INDEX
    firsts = answer.argmax(1)
    if not answer.any(1).all() or (firsts != firsts[0]).any() or \
            (data.input_ids[start:start + k, :firsts[0]] != data.input_ids[start, :firsts[0]]).any():
        raise ValueError(f"option rows {start}..{start + k - 1}: the options do not share one tokenized prompt")
    return int(firsts[0]), [int(n) for n in answer.sum(1)]


def score_options(model, params, processor, items: Sequence[tuple[str, bytes | None, Mapping[str, str]]], *,
                  batch_size: int = 16, max_length: int = 256, desc: str = "option likelihoods"
                  ) -> list[list[AnswerScores]]:
    """Per item (prompt, image, options): each option's `AnswerScores` (letter order), as `score_answers` of
    `option_examples` would give, but the prompt is run once per item instead of once per option. Items are
    batched by (has image, number of options), each group in one compiled shape."""
    examples, starts = [], []
    for prompt, image, options in items:
        starts.append(len(examples))
        examples.extend(option_examples(prompt, image, options))
    if not examples:
        return []
    data = tokenize(processor, examples, max_length, append_eos=False)
    layout = [_item_rows(data, s, len(opts)) for s, (_, _, opts) in zip(starts, items)]
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, (_, image, opts) in enumerate(items):
        groups.setdefault((image is not None, len(opts)), []).append(i)
    # one (prompt length rounded up to 8, longest option) per group: each group compiles once
    shapes = {key: (-(-max(layout[i][0] for i in members) // 8) * 8, max(max(layout[i][1]) for i in members))
              for key, members in groups.items()}
    out: list[list[AnswerScores] | None] = [None] * len(items)
    batches = [(key, members[j:j + batch_size]) for key, members in groups.items()
               for j in range(0, len(members), batch_size)]
    for (has_image, k), part in tqdm(batches, desc=desc, unit="batch", leave=False):
        rows = part + [part[0]] * (batch_size - len(part))  # fixed shape; filler rows are dropped below
        prompt_len, option_len = shapes[(has_image, k)]
        ids = np.full((batch_size, prompt_len), processor.pad_token_id, np.int32)
        mask = np.zeros((batch_size, prompt_len), np.int32)
        opt_ids = np.full((batch_size, k, option_len), processor.pad_token_id, np.int32)
        opt_mask = np.zeros((batch_size, k, option_len), np.int32)
        for b, i in enumerate(rows):
            p, lengths = layout[i]
            ids[b, prompt_len - p:], mask[b, prompt_len - p:] = data.input_ids[starts[i], :p], 1
            for j, n in enumerate(lengths):
                opt_ids[b, j, :n], opt_mask[b, j, :n] = data.input_ids[starts[i] + j, p:p + n], 1
        prompt = {"input_ids": ids, "attention_mask": mask}
        if has_image:
            prompt.update(data.image_inputs(np.asarray([starts[i] for i in rows])))
        picked, mean, var = (np.asarray(x) for x in _option_statistics(model, params, prompt, opt_ids, opt_mask))
        for b, i in enumerate(part):
            out[i] = [AnswerScores(picked[b, j, :n], mean[b, j, :n], var[b, j, :n]) for j, n in enumerate(layout[i][1])]
    return out


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
