"""What each training stage trains on, as examples in the model family's prompt format, with each source's
share of the steps.

- base: Base_Set (celebrity facts in every task format, portrait captions) plus `mc_variants` multiple-choice
  copies of each celebrity item with fresh distractors and letters;
- oracle: ft_Data's QA pairs of every fictitious person except the forget and validation people, plus (a
  deviation from MLLMU-Bench, see the package docstring) their facts in task formats (`task_variants`), and a
  `base_replay` share of base data. Its task rows never name an excluded person, not even as a distractor;
- vanilla continuing the oracle (`from_oracle`): the excluded people's rows (QA and task formats), with
  `retain_replay` and `base_replay` shares of the oracle's own data and of base data;
- vanilla from base: every fictitious person's rows and a `base_replay` share of base data.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Sequence

from ..data import mllmu, synthetic
from ..data.batching import qa_example, task_example, tokenize
from ..data.splits import oracle_excluded_ids, people_rows


def base_example(processor, row: mllmu.TrainingRow, kind: str) -> dict:
    """A Base_Set row in the exact prompt format the evaluator will use for that kind."""
    return task_example(processor, kind, row.question, row.answer, row.image)


def augmented_task_examples(processor, people: Sequence[synthetic.Person], images: dict[str, Sequence[bytes]],
                            variants: int, kinds: Sequence[str], seed: int, tag: str,
                            pools, only: set[str] | None = None) -> list[dict]:
    """`variants` copies of every person's task rows (`synthetic.task_rows`), each copy with fresh options.

    Distractors come from `pools` (the benchmark's `synthetic.fact_pools`; other people's names from `people` for
    the name question); rows are made for the people in `only` (default: all of them); visual rows cycle through
    the person's `images`. Deterministic in (seed, tag).
    """
    names = [p.name for p in people]
    out = []
    for v in range(variants):
        rng = random.Random(f"vleraser-finetune/{seed}/{tag}/{v}")
        for p in people:
            if only is not None and p.person_id not in only:
                continue
            shots = images[p.person_id]
            turn = itertools.cycle(shots[v % len(shots):] + shots[: v % len(shots)])
            for kind, visual, q, a in synthetic.task_rows(p, names, rng, kinds=kinds, pools=pools):
                out.append(task_example(processor, kind, q, a, next(turn) if visual else None))
    return out


def _celebrities(root: Path) -> tuple[list[synthetic.Person], dict[str, list[bytes]]]:
    """The celebrities (Retain_Set biographies) and every image of each: the Retain_Set portrait, then Base_Set's poses."""
    profiles = mllmu.load_profiles(root, mllmu.RETAIN_SET)
    images = {p.person_id: [p.image] for p in profiles}
    for row in synthetic.load_base_set(root, kinds=("qa",)):
        if row.image is not None and row.person_id in images and row.image not in images[row.person_id]:
            images[row.person_id].append(row.image)
    return [synthetic.person_from_profile(p) for p in profiles], images


def base_examples(c, root: Path, sc, processor) -> list[dict]:
    """The base data: Base_Set, plus `sc.mc_variants` freshly drawn multiple-choice copies per celebrity item."""
    if c.data.source != "synthetic":
        return []
    examples = [base_example(processor, r, kind)
                for kind in synthetic.BASE_KINDS for r in synthetic.load_base_set(root, kinds=(kind,))]
    if sc.mc_variants:
        people, images = _celebrities(root)
        examples += augmented_task_examples(processor, people, images, sc.mc_variants, ("classification",), c.seed,
                                            "celebrities", synthetic.fact_pools(root))
    return examples


def fictitious_examples(c, root: Path, bench: mllmu.Benchmark, processor, sc, ids: set[str],
                        distractor_ids: set[str]) -> list[dict]:
    """The QA pairs of the fictitious people `ids`, plus `sc.task_variants` copies of their facts in task formats
    (training wording; name distractors drawn from `distractor_ids`)."""
    examples = [qa_example(processor, r) for r in people_rows(bench.full_train, ids)]
    if not sc.get("task_variants", 0):
        return examples
    if c.data.source != "synthetic":
        raise ValueError("task_variants > 0 needs the synthetic benchmark (its question templates)")
    profiles = [p for p in mllmu.load_profiles(root, mllmu.FULL_SET) if p.person_id in distractor_ids]
    people = [synthetic.person_from_profile(p) for p in profiles]
    images = {p.person_id: [p.image] for p in profiles}
    return examples + augmented_task_examples(processor, people, images, sc.task_variants, tuple(sc.task_kinds),
                                              c.seed, "fictitious", synthetic.fact_pools(root), only=ids)


def stage_examples(c, stage: str, root: Path, processor) -> list[tuple[list[dict], float]]:
    """[(examples, share of the steps)] of `stage` (see the module docstring); shares sum to 1."""
    sc = getattr(c, stage)
    if stage == "base":
        return [(base_examples(c, root, sc, processor), 1.0)]
    bench = mllmu.load_benchmark(root, c.data.forget_ratio)
    everyone = {r.person_id for r in bench.full_train}
    forget, validation = oracle_excluded_ids(root, c.data.forget_ratio, c.data.get("validation_people", 0), c.seed)
    kept = everyone - set(forget) - set(validation)
    if stage == "oracle":
        shares = [(fictitious_examples(c, root, bench, processor, sc, kept, kept), 1.0)]
    elif sc.get("from_oracle", False):
        shares = [(fictitious_examples(c, root, bench, processor, sc, everyone - kept, everyone),
                   1.0 - sc.get("retain_replay", 0.0)),
                  (fictitious_examples(c, root, bench, processor, c.oracle, kept, kept), sc.get("retain_replay", 0.0))]
    else:
        shares = [(fictitious_examples(c, root, bench, processor, sc, everyone, everyone), 1.0)]
    replay = sc.get("base_replay", 0.0)
    base = base_examples(c, root, c.base, processor) if replay > 0 else []
    shares = [(examples, share * (1.0 - replay)) for examples, share in shares if share > 0]
    return shares + ([(base, replay)] if base else [])


def training_sources(c, stage: str, root: Path, processor) -> list[tuple]:
    """[(Tokenized, sampling weight)] of `stage`: a source's weight is its share of the steps over its row count,
    as `BatchSchedule` draws a pool in proportion to weight × rows."""
    max_length = getattr(c, stage).max_length
    sources = [(tokenize(processor, examples, max_length), share)
               for examples, share in stage_examples(c, stage, root, processor)]
    return [(data, share / len(data)) for data, share in sources]
