"""The MLLMU-Bench evaluator: every set × mode × task, batched jitted generation, person-level CIs.

Sets: forget, test (forget people in new images), retain, real. Modes: "visual" (Visual-QA: the image and
a question about "the person in the image") and "textual" (Textual-QA: the name in the text, no image).
Tasks (the protocol's): classification accuracy (greedy answer's letter), cloze accuracy (ground truth is
a substring), generation ROUGE-1/2/L. Beyond the protocol, clearly named and never replacing it: option
likelihood on the same multiple-choice items (`option_acc`, `option_acc_norm`: lm-evaluation-harness's acc /
acc_norm, each option's text scored as the answer) and TOFU's per-item `truth_ratio`.

Every item's score is kept (`EvalResult.items`: set, mode, metric, person, item, value), so comparisons can be
paired on the same items; each summary number is the item mean with a cluster-bootstrap interval over people.

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

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data.mllmu import EVAL_SETS, MODES, Benchmark, MultipleChoice, OpenItem, Profile
from ..data.protocol import MAX_NEW_TOKENS, Exemplar, Prompt, Prompter
from ..generate import generate_batch
from . import metrics
from .likelihood import option_choice, score_options
from .statistics import cluster_bootstrap_ci

TASKS = ("classification", "cloze", "generation")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    sets: tuple[str, ...] = EVAL_SETS
    modes: tuple[str, ...] = MODES
    tasks: tuple[str, ...] = TASKS
    few_shot_people: int = 0  # eval.py uses 2 for LLaVA; 0 = zero-shot
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 16
    # 16: on the demo's prompts (27-66 tokens) 17% padding in 4 shapes; 32 gave 27% in 4, 8 gave 12% in 6
    length_bucket: int = 16
    letter_rule: str = "first_alnum"
    option_likelihood: bool = True  # option_acc / option_acc_norm / truth_ratio on the multiple-choice items
    likelihood_max_length: int = 256  # prompt + option tokens (image tokens included) for option likelihood
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
    index: int = 0  # the item's position among this person's items of this task and mode


@dataclasses.dataclass
class EvalResult:
    results: dict  # set -> mode -> metric -> {"value", "ci_low", "ci_high", "n", "n_people"}
    predictions: list[dict]
    seconds: float
    num_prompts: int
    items: list[dict] = dataclasses.field(default_factory=list)  # {"set","mode","metric","person","item","value"}


def _image_for(profile: Profile, mode: str) -> bytes | None:
    return profile.image if mode == "visual" else None


def _subsample(people: Sequence[Profile], limit: int | None, seed: int, name: str) -> list[Profile]:
    people = list(people)
    if limit is None or len(people) <= limit:
        return people
    rng = np.random.default_rng([seed, EVAL_SETS.index(name)])
    keep = sorted(rng.choice(len(people), size=limit, replace=False))
    return [people[i] for i in keep]


def evaluated_people(benchmark: Benchmark, cfg: EvalConfig) -> dict[str, list[Profile]]:
    """The people of each evaluated set (a seeded subsample with `max_people`)."""
    return {s: _subsample(benchmark.eval_set(s), cfg.max_people, cfg.seed, s) for s in cfg.sets}


def build_requests(benchmark: Benchmark, prompter: Prompter, cfg: EvalConfig) -> list[Request]:
    """Every prompt of the evaluation, in a deterministic order."""
    requests: list[Request] = []
    for set_name, people in evaluated_people(benchmark, cfg).items():
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
                    for j, it in enumerate(mc_of(person)):
                        requests.append(Request(set_name, mode, "classification", person.person_id, it,
                                                prompter.classification(it, mode, image, mc_shots), j))
                if "cloze" in cfg.tasks and person.person_id not in shot_ids:
                    for j, it in enumerate(i for i in person.cloze if i.mode == mode):
                        requests.append(Request(set_name, mode, "cloze", person.person_id, it,
                                                prompter.cloze(it, image, cloze_shots), j))
                if "generation" in cfg.tasks:
                    for j, it in enumerate(i for i in person.generation if i.mode == mode):
                        requests.append(Request(set_name, mode, "generation", person.person_id, it,
                                                prompter.generation(it, image), j))
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


def option_requests(benchmark: Benchmark, prompter: Prompter, cfg: EvalConfig) -> list[Request]:
    """Every multiple-choice item of the evaluated people, prompted for option likelihood (zero-shot)."""
    out = []
    for set_name, people in evaluated_people(benchmark, cfg).items():
        for mode in cfg.modes:
            for person in people:
                items = person.visual_mc if mode == "visual" else person.textual_mc
                for j, it in enumerate(items):
                    out.append(Request(set_name, mode, "option", person.person_id, it,
                                       prompter.option(it, mode, _image_for(person, mode)), j))
    return out


def option_likelihood(model, params, processor, requests: Sequence[Request], cfg: EvalConfig) -> list[dict]:
    """`likelihood.option_choice` of every option request, in order."""
    items = [(r.prompt.text, r.prompt.images[0] if r.prompt.images else None, r.item.options) for r in requests]
    scores = score_options(model, params, processor, items, batch_size=cfg.batch_size,
                           max_length=cfg.likelihood_max_length, desc=f"option likelihood ({len(items)} items)")
    return [option_choice(s, r.item.options, r.item.answer) for s, r in zip(scores, requests)]


def _item(req: Request, metric: str, value: float) -> dict:
    return {"set": req.set, "mode": req.mode, "metric": metric, "person": req.person_id,
            "item": f"{req.task}{req.index}", "value": float(value)}


def score(requests: Sequence[Request], answers: Sequence[str], cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    """Per-request scores -> (per-item metric records, per-item prediction records)."""
    items, predictions = [], []
    for req, answer in zip(requests, answers):
        record: dict[str, Any] = {"set": req.set, "mode": req.mode, "task": req.task, "id": req.person_id,
                                  "question": req.item.question, "answer": answer}
        if req.task == "classification":
            ok = metrics.classification_correct(answer, req.item.options, req.item.answer, cfg.letter_rule)
            items.append(_item(req, "classification", ok))
            record.update(target=req.item.answer, correct=ok)
        elif req.task == "cloze":
            ok = metrics.cloze_correct(answer, req.item.ground_truth)
            items.append(_item(req, "cloze", ok))
            record.update(target=req.item.ground_truth, correct=ok)
        else:
            r = metrics.rouge(answer, req.item.ground_truth)
            items.extend(_item(req, name, value) for name, value in r.items())
            record.update(target=req.item.ground_truth, **r)
        predictions.append(record)
    return items, predictions


def summarize(items: Sequence[dict], cfg: EvalConfig) -> dict:
    """set -> mode -> metric -> the item mean with its cluster-bootstrap CI over people (n items, n people)."""
    groups: dict[tuple[str, str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in items:
        values, people = groups[(r["set"], r["mode"], r["metric"])]
        values.append(r["value"])
        people.append(r["person"])
    results: dict = {}
    for (set_name, mode, metric), (values, people) in sorted(groups.items()):
        results.setdefault(set_name, {}).setdefault(mode, {})[metric] = cluster_bootstrap_ci(
            values, people, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    return results


def evaluate(model, params, processor, benchmark: Benchmark, cfg: EvalConfig = EvalConfig(),
             prompter: Prompter | None = None) -> EvalResult:
    """Run the whole protocol on one model; see the module docstring."""
    start = time.perf_counter()
    prompter = prompter or Prompter.for_processor(processor)
    requests = build_requests(benchmark, prompter, cfg)
    options = option_requests(benchmark, prompter, cfg) if cfg.option_likelihood else []
    if not requests and not options:
        raise ValueError("the evaluation selects no items: check the sets/modes/tasks and the benchmark")
    answers = generate_answers(model, params, processor, requests, cfg, desc=f"answering {len(requests)} prompts")
    items, predictions = score(requests, answers, cfg)
    for req, choice in zip(options, option_likelihood(model, params, processor, options, cfg)):
        items.extend(_item(req, metric, value) for metric, value in choice.items())
    return EvalResult(summarize(items, cfg), predictions, time.perf_counter() - start, len(requests) + len(options),
                      items)
