"""Scoring rules of the MLLMU-Bench protocol (intervals and comparisons: `eval.statistics`).

The rules follow MLLMU-Bench's eval.py. There the decoded text is prompt + answer and the answer is what
follows the first "ASSISTANT:"; we decode only the generated tokens, so the same answer is the text
*before* any "ASSISTANT:" the model itself emits (`assistant_response`).
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
LETTER_RULES = ("first_alnum", "first_char")


def assistant_response(generated: str) -> str:
    """The model's answer in a generated continuation (cut at a self-generated next turn)."""
    return generated.split("ASSISTANT:")[0].strip()


def extract_letter(response: str, options: Iterable[str], rule: str = "first_alnum") -> str | None:
    """The option letter a classification answer chose, or None.

    rule "first_alnum" (DESIGN §5): the first alphanumeric character, upper-cased, e.g. "(b) Paris" -> "B".
    rule "first_char" (eval.py verbatim): the first character after stripping, so "(B)" scores as no answer.
    """
    if rule not in LETTER_RULES:
        raise ValueError(f"letter rule must be one of {LETTER_RULES}, got {rule!r}")
    text = response.strip()
    if rule == "first_alnum":
        text = "".join(ch for ch in text if ch.isalnum())
    if not text:
        return None
    letter = text[0].upper()
    return letter if letter in set(options) else None


def classification_correct(response: str, options: Mapping[str, str], answer: str, rule: str = "first_alnum") -> bool:
    return extract_letter(response, options.keys(), rule) == answer


def cloze_correct(response: str, ground_truth: str) -> bool:
    """Correct iff the lower-cased ground truth is a substring of the lower-cased answer."""
    return ground_truth.lower() in response.lower()


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of `prediction` against `reference` (rouge_score, Porter stemmer)."""
    scores = _rouge_scorer().score(reference, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}
