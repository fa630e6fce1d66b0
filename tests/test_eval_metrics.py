"""Scoring rules against hand-computed cases and the reference implementations."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from vleraser_jax.eval import metrics
from vleraser_jax.data.protocol import (
    Exemplar,
    Prompter,
    llava_classification,
    llava_cloze,
    llava_generation,
)
from vleraser_jax.data.mllmu import MultipleChoice, OpenItem

OPTIONS = {"A": "Oslo", "B": "Lima", "C": "Pune", "D": "Kobe"}


@pytest.mark.parametrize(
    "response, first_alnum, first_char",
    [
        ("B", "B", "B"),
        ("  b) Lima", "B", "B"),
        ("(C) Pune", "C", None),  # eval.py reads "(" and scores no answer
        ("**D**", "D", None),
        ("E", None, None),  # not an option
        ("", None, None),
        ("...", None, None),
        ("Answer: C", "A", "A"),  # the protocol's known false positive: "Answer" starts with A
    ],
)
def test_letter_extraction(response, first_alnum, first_char):
    assert metrics.extract_letter(response, OPTIONS, "first_alnum") == first_alnum
    assert metrics.extract_letter(response, OPTIONS, "first_char") == first_char
    with pytest.raises(ValueError):
        metrics.extract_letter("A", OPTIONS, "last_char")


def test_assistant_response_cuts_self_generated_turns():
    assert metrics.assistant_response("  Lima \nUSER: more?\nASSISTANT: yes") == "Lima \nUSER: more?"
    assert metrics.assistant_response(" B") == "B"


def test_cloze_is_case_insensitive_substring():
    assert metrics.cloze_correct("She was born in OSLO, Norway.", "Oslo")
    assert not metrics.cloze_correct("She was born in Osl.", "Oslo")
    assert metrics.cloze_correct("1987", "1987")


def test_rouge_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = [
        ("Mara Quill works as a painter in Oslo.", "Mara Quill is a painter who lives in Oslo."),
        ("running dogs", "the dog runs"),
        ("", "anything"),
    ]
    for prediction, reference in pairs:
        ours = metrics.rouge(prediction, reference)
        ref = scorer.score(reference, prediction)
        for name in ("rouge1", "rouge2", "rougeL"):
            assert ours[name] == pytest.approx(ref[name].fmeasure, abs=0)
    assert metrics.rouge("running dogs", "the dog runs")["rouge1"] == pytest.approx(0.8)  # stemming: run, dog


# ------------------------------------------------------------------ prompts, string for string (eval.py)

MC = MultipleChoice("Where was the person in the image born?", OPTIONS, "A")
MC_TEXT = MultipleChoice("Where was Mara Quill born?", OPTIONS, "A")


def test_classification_prompts_match_protocol():
    visual = llava_classification(MC, "visual", b"img")
    assert visual.text == (
        "USER: <image>\nWhere was the person in the image born?\nA: Oslo\nB: Lima\nC: Pune\nD: Kobe\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:"
    )
    assert visual.images == (b"img",)
    textual = llava_classification(MC_TEXT, "textual", None)
    assert textual.text == (
        "USER:\nWhere was Mara Quill born?\nA: Oslo\nB: Lima\nC: Pune\nD: Kobe\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:"
    )
    assert textual.images == ()


def test_few_shot_classification_prompt_matches_protocol():
    shot = Exemplar(MultipleChoice("What is the job of the person in the image?", {"A": "cook", "B": "pilot", "C": "judge", "D": "poet"}, "C"), b"shot")
    p = llava_classification(MC, "visual", b"img", [shot])
    assert p.text.startswith(
        "USER: <image>\nQuestion: What is the job of the person in the image?\nA: cook\nB: pilot\nC: judge\nD: poet\n"
        "Correct Answer: C\nUSER: <image>\nWhere was"
    )
    assert p.images == (b"shot", b"img")


def test_cloze_and_generation_prompts_match_protocol():
    cloze_v = OpenItem("The person in the image was born in __.", "Oslo", "Image_Textual")
    cloze_t = OpenItem("Mara Quill was born in __.", "Oslo", "Pure_Text")
    suffix = "\nPlease **ONLY** provide the correct answer that should replace the [Blank].\nASSISTANT:"
    assert llava_cloze(cloze_v, b"i").text == "USER: <image>\nThe person in the image was born in [Blank]." + suffix
    assert llava_cloze(cloze_t, None).text == "USER:\nMara Quill was born in [Blank]." + suffix
    shot = Exemplar(OpenItem("The person in the image works as a __.", "painter", "Image_Textual"), b"s")
    assert llava_cloze(cloze_v, b"i", [shot]).text.startswith(
        "USER:<image>\nThe person in the image works as a [Blank].\nPlease **ONLY** provide the correct answer "
        "that should replace the [Blank].\nCorrect Answer: painter\nUSER: <image>\n"
    )
    gen_v = OpenItem("What does the person in the image do?", "She paints.", "Image_Textual")
    gen_t = OpenItem("What does Mara Quill do?", "She paints.", "Pure_Text")
    assert llava_generation(gen_v, b"i").text == (
        "USER: <image>\nWhat does the person in the image do?\nAnswer the question based on your trained knowledge "
        "in one sentence accurately in ENGLISH.\nASSISTANT: "
    )
    assert llava_generation(gen_t, None).text == (
        "USER: What does Mara Quill do?\nAnswer the question based on your trained knowledge in one sentence in "
        "ENGLISH.\nASSISTANT:"
    )


def test_chat_family_prompts_use_the_formatter_and_refuse_few_shot():
    prompter = Prompter("qwen2_vl", chat=lambda text, image: f"<chat image={image}>{text}</chat>")
    p = prompter.classification(MC_TEXT, "textual")
    assert p.text.startswith("<chat image=False>Where was Mara Quill born?\nA: Oslo") and p.images == ()
    with pytest.raises(ValueError, match="zero-shot"):
        prompter.classification(MC, "visual", b"i", [Exemplar(MC, b"s")])
    with pytest.raises(ValueError, match="chat formatter"):
        Prompter("qwen2_vl")
