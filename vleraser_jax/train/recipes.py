"""What each training stage trains on, as examples in the model family's prompt format.

- base: Base_Set (celebrity facts in every task format, portrait captions) plus `mc_variants` multiple-choice
  copies of each celebrity item with fresh distractors and letters;
- vanilla: ft_Data's QA pairs plus, a deviation from MLLMU-Bench (see the package docstring), the fictitious
  people's facts in task formats (`vanilla.task_variants`), and a replay share of the base data.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Sequence

from ..data import mllmu, synthetic
from ..data.batching import task_example


def base_example(processor, row: mllmu.TrainingRow, kind: str) -> dict:
    """A Base_Set row in the exact prompt format the evaluator will use for that kind."""
    return task_example(processor, kind, row.question, row.answer, row.image)


def augmented_task_examples(processor, people: Sequence[synthetic.Person], images: dict[str, Sequence[bytes]],
                            variants: int, kinds: Sequence[str], seed: int, tag: str) -> list[dict]:
    """`variants` copies of every person's task rows (`synthetic.task_rows`), each copy with fresh options.

    Distractors (other people's names for the name question) come from `people`; visual rows cycle
    through the person's `images`. Deterministic in (seed, tag).
    """
    names = [p.name for p in people]
    out = []
    for v in range(variants):
        rng = random.Random(f"vleraser-finetune/{seed}/{tag}/{v}")
        for p in people:
            shots = images[p.person_id]
            turn = itertools.cycle(shots[v % len(shots):] + shots[: v % len(shots)])
            for kind, visual, q, a in synthetic.task_rows(p, names, rng, kinds=kinds):
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
                                            "celebrities")
    return examples


def vanilla_task_examples(c, root: Path, bench: mllmu.Benchmark, processor) -> list[dict]:
    """The deviation (see the module docstring): the fictitious people's facts in task formats, training wording."""
    v = c.vanilla
    if not v.get("task_variants", 0):
        return []
    if c.data.source != "synthetic":
        raise ValueError("vanilla.task_variants > 0 needs the synthetic benchmark (its question templates)")
    profiles = mllmu.load_profiles(root, mllmu.FULL_SET)
    people = [synthetic.person_from_profile(p) for p in profiles]
    images = {p.person_id: [p.image] for p in profiles}
    return augmented_task_examples(processor, people, images, v.task_variants, tuple(v.task_kinds), c.seed,
                                   "fictitious")
