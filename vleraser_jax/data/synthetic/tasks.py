"""Task items about a person: multiple choice with balanced letters, generation and cloze items, training
QA pairs, in the protocol's formats."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import mllmu
from ..mllmu import GEN_INSTRUCTION_TEXTUAL, GEN_INSTRUCTION_VISUAL, OPTION_LETTERS
from ..protocol import classification_instruction, cloze_question
from .people import (FACT_KEYS, FACT_POOLS, N_OPEN_ITEMS, TRAIN, VISUAL_SUBJECT, Person, _subject, answer_sentence,
                     cloze_sentence, question)


class _LetterDealer:
    """Correct-answer positions from shuffled decks of A-D: every four items use each letter once."""

    def __init__(self, rng: random.Random):
        self.rng, self.deck = rng, []

    def __call__(self) -> int:
        if not self.deck:
            self.deck = [0, 1, 2, 3]
            self.rng.shuffle(self.deck)
        return self.deck.pop()


def _choice_item(person: Person, key: str, visual: bool, variant: int, names: Sequence[str],
                 rng: random.Random, deal: _LetterDealer, pools: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    correct = person.value(key)
    pool = names if key == "Name" else pools[key]
    options = rng.sample([v for v in pool if v != correct], 3)
    pos = deal()
    options.insert(pos, correct)
    return {"Correct_Answer": OPTION_LETTERS[pos], "Options": dict(zip(OPTION_LETTERS, options)),
            "Question": question(key, _subject(person, visual), variant)}


def _tasks(person: Person, names: Sequence[str], variant: int, rng: random.Random, deal: _LetterDealer,
           pools: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Classification_Task, Generation_Task and Mask_Task of one person, in wording `variant`."""
    visual_keys = ("Name", *FACT_KEYS)
    mc_visual = [_choice_item(person, k, True, variant, names, rng, deal, pools) for k in visual_keys]
    mc_textual = [_choice_item(person, k, False, variant, names, rng, deal, pools) for k in FACT_KEYS]
    generation, mask = [], []
    for visual, keys in ((True, visual_keys), (False, FACT_KEYS)):
        kind = "Image_Textual" if visual else "Pure_Text"
        subj = _subject(person, visual)
        for k in rng.sample(keys, N_OPEN_ITEMS):
            generation.append({"Ground_Truth": answer_sentence(k, person.value(k), subj),
                               "Question": question(k, subj, variant), "Type": kind})
        for k in rng.sample(keys, N_OPEN_ITEMS):
            mask.append({"Ground_Truth": person.value(k), "Question": cloze_sentence(k, subj, variant), "Type": kind})
    return {"Classification_Task": {"Image_Textual_Questions": mc_visual, "Pure_Text_Questions": mc_textual},
            "Generation_Task": generation, "Mask_Task": mask}


TASK_KINDS = ("classification", "generation", "cloze")


def task_rows(person: Person, names: Sequence[str], rng: random.Random, deal: Callable[[], int] | None = None, *,
              kinds: Sequence[str] = TASK_KINDS, variant: int = TRAIN,
              pools: Mapping[str, Sequence[str]] = FACT_POOLS) -> list[tuple[str, bool, str, str]]:
    """`person`'s facts as training rows in the evaluation's task formats: `(kind, visual, question, answer)`.

    Every key is asked with the image (the name too) and every fact with the name, in wording `variant`;
    `question` is the user text of eval.py's prompt for that kind (options and instruction included).
    Multiple-choice distractors are drawn from `rng`: other values in `pools` (the benchmark's `fact_pools`), other
    `names` for the name question; the correct letter from `deal` (a fresh `_LetterDealer(rng)` if None), so each
    call with a new `rng` state gives freshly shuffled options: the augmentation the tiny models need to learn the
    multiple-choice skill.
    """
    bad = set(kinds) - set(TASK_KINDS)
    if bad:
        raise ValueError(f"kinds {sorted(bad)}; expected a subset of {TASK_KINDS}")
    deal = deal or _LetterDealer(rng)
    rows = []
    for visual, keys in ((True, ("Name", *FACT_KEYS)), (False, FACT_KEYS)):
        subj = _subject(person, visual)
        instruction = GEN_INSTRUCTION_VISUAL if visual else GEN_INSTRUCTION_TEXTUAL
        for k in keys:
            if "classification" in kinds:
                item = _choice_item(person, k, visual, variant, names, rng, deal, pools)
                rows.append(("classification", visual, _format_mc(item), item["Correct_Answer"]))
            if "generation" in kinds:
                rows.append(("generation", visual, question(k, subj, variant) + "\n" + instruction,
                             answer_sentence(k, person.value(k), subj)))
            if "cloze" in kinds:
                rows.append(("cloze", visual, _format_cloze(cloze_sentence(k, subj, variant)), person.value(k)))
    return rows


def _training_pairs(person: Person) -> list[dict[str, str]]:
    """The `metadata` QA pairs (training wording): the name with the image, each fact both ways."""
    pairs = [{"Question": question("Name", VISUAL_SUBJECT, TRAIN),
              "Answer": answer_sentence("Name", person.name, VISUAL_SUBJECT),
              "ID": person.person_id, "Type": "Image_Textual"}]
    for k in FACT_KEYS:
        for visual in (True, False):
            subj = _subject(person, visual)
            pairs.append({"Question": question(k, subj, TRAIN), "Answer": answer_sentence(k, person.value(k), subj),
                          "ID": person.person_id, "Type": "Image_Textual" if visual else "Pure_Text"})
    return pairs


def _summary_qa(person: Person) -> tuple[str, str]:
    """The row-level `question` / `answer` columns (not used by the loader)."""
    occ = person.value("Employment")
    article = "an" if occ[:1] in "aeiou" else "a"
    return ("Who is the person in the image, and what is their occupation?",
            f"The person in the image is {person.name}, who works as {article} {occ}.")


def _format_mc(item: dict[str, Any]) -> str:
    """The protocol's classification question (options + instruction), from an MLLMU item dict."""
    return classification_instruction(mllmu.MultipleChoice(item["Question"], item["Options"], ""))


def _format_cloze(q: str) -> str:
    return cloze_question(q)
