"""MLLMU-Bench prompts, string for string as its eval.py builds them for LLaVA.

Each task has an instruction (the user's text) and, for LLaVA, eval.py's exact turn markers — including
its quirks, kept on purpose so numbers are comparable: textual classification/cloze turns start
"USER:\\n" but textual generation "USER: "; visual generation ends "ASSISTANT: " (trailing space); the
textual generation instruction lacks "accurately"; cloze exemplars write "USER:<image>" with no space.
Chat-template models (Qwen2-VL) get the same instruction through their processor's `build_prompt`.

A `Prompt` carries its text and the images its `<image>` markers stand for, in order.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from .mllmu import (
    CLOZE_INSTRUCTION,
    GEN_INSTRUCTION_TEXTUAL,
    GEN_INSTRUCTION_VISUAL,
    MC_INSTRUCTION,
    MultipleChoice,
    OpenItem,
)

CLASSIFICATION_INSTRUCTION = MC_INSTRUCTION
GENERATION_INSTRUCTION = {"visual": GEN_INSTRUCTION_VISUAL, "textual": GEN_INSTRUCTION_TEXTUAL}
MAX_NEW_TOKENS = 50  # eval.py generates at most 50 tokens for every task
# Ours, not eval.py's: the instruction under a multiple-choice *question* (its options not shown) when each
# option's text is scored as the answer (option likelihood). It is the cloze instruction without its "[Blank]":
# it asks for the bare answer, so the option text is the natural continuation; asked with the question alone
# (QA framing), the tiny models, trained on full-sentence answers that start with the subject, score options at
# chance in Visual-QA (measured: README, evaluation).
OPTION_INSTRUCTION = "Please **ONLY** provide the correct answer."


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    images: tuple[bytes, ...] = ()


@dataclasses.dataclass(frozen=True)
class Exemplar:
    """A solved item shown before the question (few-shot), with its image for visual items."""

    item: MultipleChoice | OpenItem
    image: bytes | None = None


def options_block(options: dict[str, str]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in options.items())


def cloze_question(question: str) -> str:
    return question.replace("__", "[Blank]") + "\n" + CLOZE_INSTRUCTION


def classification_instruction(item: MultipleChoice) -> str:
    return f"{item.question}\n{options_block(item.options)}\n{CLASSIFICATION_INSTRUCTION}"


def _classification_exemplar(ex: Exemplar, mode: str) -> str:
    item = ex.item
    opts = "".join(f"{letter}: {item.options[letter]}\n" for letter in ("A", "B", "C", "D"))
    head = "USER: <image>\n" if mode == "visual" else "USER:\n"
    return f"{head}Question: {item.question}\n{opts}Correct Answer: {item.answer}\n"


def _cloze_exemplar(ex: Exemplar, mode: str) -> str:
    head = "USER:<image>\n" if mode == "visual" else "USER:\n"
    return f"{head}{cloze_question(ex.item.question)}\nCorrect Answer: {ex.item.ground_truth}\n"


def _exemplar_images(exemplars: Sequence[Exemplar], mode: str) -> tuple[bytes, ...]:
    return tuple(ex.image for ex in exemplars if mode == "visual" and ex.image is not None)


def llava_turn(task: str, mode: str, user_text: str) -> str:
    """eval.py's LLaVA turn around an instruction, by task and mode (its quirks included)."""
    if mode == "visual":
        return f"USER: <image>\n{user_text}\nASSISTANT:" + (" " if task == "generation" else "")
    if task == "generation":
        return f"USER: {user_text}\nASSISTANT:"
    return f"USER:\n{user_text}\nASSISTANT:"


def llava_classification(item: MultipleChoice, mode: str, image: bytes | None, exemplars: Sequence[Exemplar] = ()) -> Prompt:
    shots = "".join(_classification_exemplar(ex, mode) for ex in exemplars)
    text = shots + llava_turn("classification", mode, classification_instruction(item))
    return Prompt(text, _exemplar_images(exemplars, mode) + (image,) if mode == "visual" else ())


def llava_cloze(item: OpenItem, image: bytes | None, exemplars: Sequence[Exemplar] = ()) -> Prompt:
    mode = item.mode
    shots = "".join(_cloze_exemplar(ex, mode) for ex in exemplars)
    text = shots + llava_turn("cloze", mode, cloze_question(item.question))
    return Prompt(text, _exemplar_images(exemplars, mode) + (image,) if mode == "visual" else ())


def llava_generation(item: OpenItem, image: bytes | None) -> Prompt:
    text = llava_turn("generation", item.mode, f"{item.question}\n{GENERATION_INSTRUCTION[item.mode]}")
    return Prompt(text, (image,) if item.mode == "visual" else ())


class Prompter:
    """Builds the protocol's prompts for one model family.

    family "llava": eval.py's literal strings, zero- or few-shot. Any other family needs
    `chat(user_text, with_image)`, its processor's chat-template formatter, and is evaluated zero-shot
    (eval.py defines few-shot turns only in LLaVA's plain-text format).
    """

    def __init__(self, family: str = "llava", chat: Callable[[str, bool], str] | None = None):
        if family != "llava" and chat is None:
            raise ValueError(f"model family {family!r} needs a chat formatter (its processor's build_prompt)")
        self.family, self.chat = family, chat

    @classmethod
    def for_processor(cls, processor) -> "Prompter":
        """The prompter of the processor's model family (LLaVA's literal strings, else its chat template)."""
        if processor.family == "llava":
            return cls("llava")
        return cls(processor.family, processor.build_prompt)

    def turn(self, task: str, mode: str, user_text: str) -> str:
        """The prompt text the protocol puts around `user_text` for `task` ("classification" | "cloze" |
        "generation") in `mode`, zero-shot; `<image>` marker included for visual mode."""
        if self.family == "llava":
            return llava_turn(task, mode, user_text)
        return self.chat(user_text, mode == "visual")

    def classification(self, item: MultipleChoice, mode: str, image=None, exemplars=()) -> Prompt:
        if self.family == "llava":
            return llava_classification(item, mode, image, exemplars)
        return self._chat(classification_instruction(item), mode, image, exemplars)

    def cloze(self, item: OpenItem, image=None, exemplars=()) -> Prompt:
        if self.family == "llava":
            return llava_cloze(item, image, exemplars)
        return self._chat(cloze_question(item.question), item.mode, image, exemplars)

    def option(self, item: MultipleChoice, mode: str, image=None) -> Prompt:
        """The prompt whose continuation each option text is scored as (`OPTION_INSTRUCTION`), zero-shot, in the
        cloze task's turn format."""
        text = self.turn("cloze", mode, f"{item.question}\n{OPTION_INSTRUCTION}")
        return Prompt(text, (image,) if mode == "visual" else ())

    def generation(self, item: OpenItem, image=None) -> Prompt:
        if self.family == "llava":
            return llava_generation(item, image)
        return self._chat(f"{item.question}\n{GENERATION_INSTRUCTION[item.mode]}", item.mode, image, ())

    def _chat(self, user_text: str, mode: str, image, exemplars) -> Prompt:
        if exemplars:
            raise ValueError(f"few-shot prompts are defined for LLaVA only; evaluate {self.family} zero-shot")
        return Prompt(self.turn("", mode, user_text), (image,) if mode == "visual" else ())
