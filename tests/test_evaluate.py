"""The evaluator end to end on a tiny random LLaVA, and the report it feeds."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from vleraser_jax.data.mllmu import Benchmark, MultipleChoice, OpenItem, Profile
from vleraser_jax.eval import evaluate as ev
from vleraser_jax.data.protocol import Prompter
from vleraser_jax.eval.report import load_results, render_markdown, write_report
from vleraser_jax.generate import generate
from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.processing import load_processor


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def person(pid: str, seed: int) -> Profile:
    name = f"Mara Quill {pid}"
    opts = {"A": "Oslo", "B": "Lima", "C": "Pune", "D": "Kobe"}
    return Profile(
        person_id=pid,
        name=name,
        image=png(seed),
        biography={"Name": name, "Born": "Oslo"},
        visual_mc=(MultipleChoice("Where was the person in the image born?", opts, "A"),),
        textual_mc=(MultipleChoice(f"Where was {name} born?", opts, "B"), MultipleChoice(f"What does {name} do?", {"A": "paint", "B": "sing", "C": "cook", "D": "fly"}, "A")),
        generation=(OpenItem("What does the person in the image do?", "She is a painter.", "Image_Textual"),
                    OpenItem(f"What does {name} do?", "She is a painter.", "Pure_Text")),
        cloze=(OpenItem("The person in the image was born in __.", "Oslo", "Image_Textual"),
               OpenItem(f"{name} was born in __.", "Oslo", "Pure_Text")),
    )


@pytest.fixture(scope="module")
def setup(full_checkpoint):
    model, params, config = load_pretrained(full_checkpoint)
    processor = load_processor(full_checkpoint)
    people = [person(f"p{i}", i) for i in range(6)]
    bench = Benchmark(
        root="memory", forget_ratio=5, forget=tuple(people[:2]), test=tuple(people[:2]), retain=tuple(people[2:5]),
        real=(people[5],), forget_train=(), retain_train=(), full_train=(),
    )
    return model, params, processor, bench


CFG = ev.EvalConfig(batch_size=4, max_new_tokens=6, bootstrap_resamples=200)


def test_evaluate_structure_and_counts(setup):
    model, params, processor, bench = setup
    out = ev.evaluate(model, params, processor, bench, CFG)
    # 8 people over the four sets, 7 prompts each: 1 visual + 2 textual MC, 1+1 cloze, 1+1 generation
    assert out.num_prompts == 8 * 7
    assert out.results["retain"]["textual"]["classification"]["n"] == 6
    assert out.results["real"]["visual"]["rougeL"]["n"] == 1
    for set_res in out.results.values():
        for mode_res in set_res.values():
            assert {"classification", "classification_loglik", "cloze", "rouge1", "rouge2", "rougeL"} <= set(mode_res)
            for entry in mode_res.values():
                assert 0.0 <= entry["ci_low"] <= entry["value"] <= entry["ci_high"] <= 1.0
    assert len(out.predictions) == out.num_prompts


def test_batched_bucketed_answers_equal_one_prompt_at_a_time(setup):
    model, params, processor, bench = setup
    requests = ev.build_requests(bench, Prompter("llava"), dataclasses.replace(CFG, sets=("forget", "real")))
    answers = ev.generate_answers(model, params, processor, requests, CFG)
    for req, answer in list(zip(requests, answers))[::3]:
        images = [ev._decode_image(b) for b in req.prompt.images] or None
        batch = processor([req.prompt.text], images=images)
        out = generate(model, params, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                       max_new_tokens=CFG.max_new_tokens, eos_token_id=processor.eos_token_id,
                       pad_token_id=processor.pad_token_id)
        from vleraser_jax.eval.metrics import assistant_response

        assert answer == assistant_response(processor.decode(out.trimmed()[0]))


def test_loglik_choice_equals_brute_force(setup):
    model, params, processor, bench = setup
    requests = [r for r in ev.build_requests(bench, Prompter("llava"), CFG) if r.task == "classification"][:5]
    chosen = ev.loglik_choices(model, params, processor, requests, CFG)
    for req, letter in zip(requests, chosen):
        scores = {}
        for option in "ABCD":
            images = [ev._decode_image(b) for b in req.prompt.images] or None
            full = processor([req.prompt.text + " " + option], images=images)
            prompt = processor([req.prompt.text], images=images)
            logits = np.asarray(model.apply({"params": params}, **full).logits[0], np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            ids = full["input_ids"][0]
            start = prompt["input_ids"].shape[1]
            scores[option] = sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))
        assert letter == max(scores, key=scores.get)


def test_few_shot_excludes_exemplar_people(setup):
    model, params, processor, bench = setup
    cfg = dataclasses.replace(CFG, few_shot_people=1, sets=("retain",), tasks=("classification", "cloze"))
    requests = ev.build_requests(bench, Prompter("llava"), cfg)
    ids = {r.person_id for r in requests}
    assert len(ids) == 2  # one of the three retain people became the exemplar
    visual = [r for r in requests if r.mode == "visual" and r.task == "classification"]
    assert all(r.prompt.text.startswith("USER: <image>\nQuestion:") and len(r.prompt.images) == 2 for r in visual)


def test_report_accumulates_methods(setup, tmp_path):
    model, params, processor, bench = setup
    out = ev.evaluate(model, params, processor, bench, dataclasses.replace(CFG, tasks=("classification",), loglik=False))
    write_report(tmp_path, "vanilla", out.results, {"model": "tiny"})
    files = write_report(tmp_path, "VL-Eraser", out.results)
    methods = load_results(tmp_path)
    assert list(methods) == ["vanilla", "VL-Eraser"]
    data = json.loads(files["results"].read_text())
    assert data["meta"] == {"model": "tiny"}
    entry = data["methods"]["vanilla"]["forget"]["visual"]["classification"]
    assert set(entry) == {"value", "ci_low", "ci_high", "n"}
    md = files["markdown"].read_text()
    assert "| Method | Forget: Class. acc %" in md and "| VL-Eraser |" in md
    assert md == render_markdown(methods, data["meta"])
    for key in ("forget_vs_retain", "sets_visual", "sets_textual"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
