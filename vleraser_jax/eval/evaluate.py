"""The MLLMU-Bench evaluator: every set × mode × task, batched jitted generation, bootstrap CIs.

Sets: forget, test (forget people in new images), retain, real. Modes: "visual" (Visual-QA: the image and
a question about "the person in the image") and "textual" (Textual-QA: the name in the text, no image).
Tasks (the protocol's): classification accuracy (greedy answer's letter), cloze accuracy (ground truth is
a substring), generation ROUGE-1/2/L. Extra, clearly named and never replacing the protocol's:
`classification_loglik`, the option letter with the highest log-likelihood after the prompt.

Batches are padded to fixed shapes (batch size; prompt length rounded up to `length_bucket`) so a whole
evaluation compiles a handful of programs, not one per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import time
from collections import defaultdict
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data.mllmu import EVAL_SETS, MODES, Benchmark, MultipleChoice, OpenItem, Profile
from ..generate import generate_batch
from ..processing import image_inputs_of
from . import metrics
from ..data.protocol import MAX_NEW_TOKENS, Exemplar, Prompt, Prompter

TASKS = ("classification", "cloze", "generation")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    sets: tuple[str, ...] = EVAL_SETS
    modes: tuple[str, ...] = MODES
    tasks: tuple[str, ...] = TASKS
    few_shot_people: int = 0  # eval.py uses 2 for LLaVA; 0 = zero-shot
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 16
    length_bucket: int = 32
    letter_rule: str = "first_alnum"
    loglik: bool = True
    max_people: int | None = None  # per set, a seeded subsample (None = everyone)
    bootstrap_resamples: int = 1000
    seed: int = 0

    def __post_init__(self):
        for name, values, allowed in (("sets", self.sets, EVAL_SETS), ("modes", self.modes, MODES), ("tasks", self.tasks, TASKS)):
            bad = set(values) - set(allowed)
            if bad:
                raise ValueError(f"EvalConfig.{name}: unknown {sorted(bad)}; allowed {allowed}")
        if self.letter_rule not in metrics.LETTER_RULES:
            raise ValueError(f"EvalConfig.letter_rule must be one of {metrics.LETTER_RULES}")


@dataclasses.dataclass(frozen=True)
class Request:
    set: str
    mode: str
    task: str
    person_id: str
    item: MultipleChoice | OpenItem
    prompt: Prompt


@dataclasses.dataclass
class EvalResult:
    results: dict  # set -> mode -> metric -> {"value", "ci_low", "ci_high", "n"}
    predictions: list[dict]
    seconds: float
    num_prompts: int


def _image_for(profile: Profile, mode: str) -> bytes | None:
    return profile.image if mode == "visual" else None


def _subsample(people: Sequence[Profile], limit: int | None, seed: int, name: str) -> list[Profile]:
    people = list(people)
    if limit is None or len(people) <= limit:
        return people
    rng = np.random.default_rng([seed, EVAL_SETS.index(name)])
    keep = sorted(rng.choice(len(people), size=limit, replace=False))
    return [people[i] for i in keep]


def build_requests(benchmark: Benchmark, prompter: Prompter, cfg: EvalConfig) -> list[Request]:
    """Every prompt of the evaluation, in a deterministic order."""
    requests: list[Request] = []
    for set_name in cfg.sets:
        people = _subsample(benchmark.eval_set(set_name), cfg.max_people, cfg.seed, set_name)
        shots: list[Profile] = []
        if cfg.few_shot_people:
            rng = np.random.default_rng([cfg.seed, 1000 + EVAL_SETS.index(set_name)])
            picks = rng.choice(len(people), size=min(cfg.few_shot_people, len(people)), replace=False)
            shots = [people[i] for i in sorted(picks)]
        shot_ids = {p.person_id for p in shots}
        for mode in cfg.modes:
            mc_of = (lambda p: p.visual_mc) if mode == "visual" else (lambda p: p.textual_mc)
            mc_shots = [Exemplar(it, _image_for(p, mode)) for p in shots for it in mc_of(p)]
            cloze_shots = [Exemplar(it, _image_for(p, mode)) for p in shots for it in p.cloze if it.mode == mode]
            for person in people:
                image = _image_for(person, mode)
                # eval.py skips the exemplars' own items; generation has no exemplars.
                if "classification" in cfg.tasks and person.person_id not in shot_ids:
                    for it in mc_of(person):
                        requests.append(Request(set_name, mode, "classification", person.person_id, it,
                                                prompter.classification(it, mode, image, mc_shots)))
                if "cloze" in cfg.tasks and person.person_id not in shot_ids:
                    for it in person.cloze:
                        if it.mode == mode:
                            requests.append(Request(set_name, mode, "cloze", person.person_id, it,
                                                    prompter.cloze(it, image, cloze_shots)))
                if "generation" in cfg.tasks:
                    for it in person.generation:
                        if it.mode == mode:
                            requests.append(Request(set_name, mode, "generation", person.person_id, it,
                                                    prompter.generation(it, image)))
    return requests


@functools.lru_cache(maxsize=4096)
def _decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _padded_batches(requests: Sequence[Request], texts: Sequence[str], processor, cfg: EvalConfig):
    """Yield (indices, batch) with fixed batch size and bucketed length; filler rows repeat a real row."""
    order = sorted(range(len(requests)), key=lambda i: (len(requests[i].prompt.images), len(texts[i])))
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        rows = idx + [idx[-1]] * (cfg.batch_size - len(idx))
        images = [_decode_image(b) for i in rows for b in requests[i].prompt.images]
        batch = processor([texts[i] for i in rows], images=images or None, padding_side="left")
        length = batch["input_ids"].shape[1]
        extra = -length % cfg.length_bucket
        if extra:
            batch["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (extra, 0)), constant_values=processor.pad_token_id)
            batch["attention_mask"] = np.pad(batch["attention_mask"], ((0, 0), (extra, 0)))
        yield idx, batch


def generate_answers(model, params, processor, requests: Sequence[Request], cfg: EvalConfig, desc: str = "generating") -> list[str]:
    """Greedy answers (the protocol's post-processing applied) for every request."""
    texts = [r.prompt.text for r in requests]
    answers: list[str] = [""] * len(requests)
    batches = _padded_batches(requests, texts, processor, cfg)
    for idx, batch in tqdm(batches, total=-(-len(requests) // cfg.batch_size), desc=desc, unit="batch", leave=False):
        out = generate_batch(model, params, batch, processor, max_new_tokens=cfg.max_new_tokens)
        for row, tokens in zip(idx, out.trimmed()):
            answers[row] = metrics.assistant_response(processor.decode(tokens))
    return answers


@functools.partial(jax.jit, static_argnames=("model",))
def _token_logprobs(model, params, input_ids, attention_mask, images):
    """log p(token t+1 | tokens ≤ t) for every position: [B, T-1] (f32). images: the batch's image inputs."""
    logits = model.apply({"params": params}, input_ids=input_ids, attention_mask=attention_mask, **images).logits
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


def loglik_choices(model, params, processor, requests: Sequence[Request], cfg: EvalConfig) -> list[str]:
    """For each classification request, the letter whose answer " L" is most likely after the prompt."""
    letters = ("A", "B", "C", "D")
    expanded = [(i, letter) for i, r in enumerate(requests) for letter in letters if letter in r.item.options]
    reqs = [requests[i] for i, _ in expanded]
    texts = [requests[i].prompt.text + " " + letter for i, letter in expanded]
    tok = processor.tokenizer
    prompt_len = {i: len(tok(requests[i].prompt.text)["input_ids"]) for i in {i for i, _ in expanded}}
    scores = np.full(len(expanded), -np.inf)
    for idx, batch in tqdm(_padded_batches(reqs, texts, processor, cfg), total=-(-len(reqs) // cfg.batch_size),
                           desc="log-likelihood choices", unit="batch", leave=False):
        images = image_inputs_of(batch)
        lp = np.asarray(_token_logprobs(model, params, batch["input_ids"], batch["attention_mask"], images))
        for row, k in enumerate(idx):
            i, _ = expanded[k]
            # image tokens expand the prompt identically with or without the answer, so count text tokens
            n_answer = len(tok(texts[k])["input_ids"]) - prompt_len[i]
            scores[k] = lp[row, lp.shape[1] - n_answer :].sum()
    best: dict[int, tuple[float, str]] = {}
    for (i, letter), s in zip(expanded, scores):
        if i not in best or s > best[i][0]:
            best[i] = (s, letter)
    return [best[i][1] for i in range(len(requests))]


def score(requests: Sequence[Request], answers: Sequence[str], cfg: EvalConfig, loglik: Sequence[str | None] | None = None):
    """Per-request scores -> (results with bootstrap CIs, per-item prediction records)."""
    per_metric: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    predictions = []
    for k, (req, answer) in enumerate(zip(requests, answers)):
        record: dict[str, Any] = {"set": req.set, "mode": req.mode, "task": req.task, "id": req.person_id,
                                  "question": req.item.question, "answer": answer}
        if req.task == "classification":
            ok = metrics.classification_correct(answer, req.item.options, req.item.answer, cfg.letter_rule)
            per_metric[(req.set, req.mode, "classification")].append(float(ok))
            record.update(target=req.item.answer, correct=ok)
            if loglik is not None and loglik[k] is not None:
                per_metric[(req.set, req.mode, "classification_loglik")].append(float(loglik[k] == req.item.answer))
                record["loglik_choice"] = loglik[k]
        elif req.task == "cloze":
            ok = metrics.cloze_correct(answer, req.item.ground_truth)
            per_metric[(req.set, req.mode, "cloze")].append(float(ok))
            record.update(target=req.item.ground_truth, correct=ok)
        else:
            r = metrics.rouge(answer, req.item.ground_truth)
            for name, value in r.items():
                per_metric[(req.set, req.mode, name)].append(value)
            record.update(target=req.item.ground_truth, **r)
        predictions.append(record)
    results: dict = {}
    for (set_name, mode, metric), values in sorted(per_metric.items()):
        results.setdefault(set_name, {}).setdefault(mode, {})[metric] = metrics.bootstrap_ci(
            values, resamples=cfg.bootstrap_resamples, seed=cfg.seed
        )
    return results, predictions


def evaluate(model, params, processor, benchmark: Benchmark, cfg: EvalConfig = EvalConfig(), prompter: Prompter | None = None) -> EvalResult:
    """Run the whole protocol on one model; see the module docstring."""
    start = time.perf_counter()
    prompter = prompter or Prompter.for_processor(processor)
    requests = build_requests(benchmark, prompter, cfg)
    if not requests:
        raise ValueError("the evaluation selects no items: check the sets/modes/tasks and the benchmark")
    answers = generate_answers(model, params, processor, requests, cfg, desc=f"answering {len(requests)} prompts")
    loglik = None
    if cfg.loglik:
        mc = [i for i, r in enumerate(requests) if r.task == "classification"]
        loglik = [None] * len(requests)
        if mc:
            for i, letter in zip(mc, loglik_choices(model, params, processor, [requests[i] for i in mc], cfg)):
                loglik[i] = letter
    results, predictions = score(requests, answers, cfg, loglik)
    return EvalResult(results, predictions, time.perf_counter() - start, len(requests))
