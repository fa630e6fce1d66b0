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
from vleraser_jax.eval.report import load_items, load_results, write_report
from vleraser_jax.eval.report_tables import render_markdown
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
    # 8 people over the four sets, 7 generation prompts each (1 visual + 2 textual MC, 1+1 cloze, 1+1 generation)
    # and 3 option-likelihood prompts (the same MC items)
    assert out.num_prompts == 8 * (7 + 3)
    assert out.results["retain"]["textual"]["classification"]["n"] == 6
    assert out.results["retain"]["textual"]["classification"]["n_people"] == 3
    assert out.results["real"]["visual"]["rougeL"]["n"] == 1
    for set_res in out.results.values():
        for mode_res in set_res.values():
            assert {"classification", "option_acc", "option_acc_norm", "truth_ratio", "cloze", "rouge1", "rouge2",
                    "rougeL"} <= set(mode_res)
            for metric, entry in mode_res.items():
                assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
                assert metric == "truth_ratio" or entry["ci_high"] <= 1.0
    assert len(out.predictions) == 8 * 7
    # one record per item and metric, each naming its person
    assert len([r for r in out.items if r["metric"] == "option_acc"]) == 8 * 3
    assert {r["person"] for r in out.items if r["set"] == "retain"} == {"p2", "p3", "p4"}


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
    out = ev.evaluate(model, params, processor, bench, dataclasses.replace(CFG, tasks=("cloze",)))
    write_report(tmp_path, "vanilla", out.results, {"model": "tiny"}, items=out.items)
    files = write_report(tmp_path, "VL-Eraser", out.results)
    methods = load_results(tmp_path)
    assert list(methods) == ["vanilla", "VL-Eraser"]
    data = json.loads(files["results"].read_text())
    assert data["meta"] == {"model": "tiny"}
    entry = data["methods"]["vanilla"]["forget"]["visual"]["cloze"]
    assert set(entry) == {"value", "ci_low", "ci_high", "n", "n_people"}
    assert load_items(tmp_path, "vanilla") == out.items and load_items(tmp_path, "VL-Eraser") is None
    md = files["markdown"].read_text()
    assert "| Method | Forget: Class. acc %" in md and "| VL-Eraser |" in md
    assert md == render_markdown(methods, data["meta"])
    for key in ("sets_visual_cloze", "sets_textual_cloze", "sets_visual_option", "sets_textual_option"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_option_likelihood_equals_a_hand_computation_from_torch_logits(setup, full_checkpoint):
    """Each option's summed log-probability, computed from transformers' own logits on the same token ids, picks
    the same option and gives the same truth ratio (the answer seam is the training collator's)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vleraser_jax.eval.likelihood import option_choice, score_options

    model, params, processor, bench = setup
    reference = LlavaForConditionalGeneration.from_pretrained(full_checkpoint).eval()
    requests = ev.option_requests(bench, Prompter("llava"), dataclasses.replace(CFG, sets=("forget",)))
    assert {r.mode for r in requests} == {"visual", "textual"}
    # what evaluate runs: the prompt once per item, each option a cached chunk after it
    scored = score_options(model, params, processor, [(r.prompt.text, r.prompt.images[0] if r.prompt.images else
                                                       None, r.item.options) for r in requests], batch_size=4)
    for req, ours in zip(requests, scored):
        image = req.prompt.images[0] if req.prompt.images else None
        examples = [{"prompt": req.prompt.text, "answer": req.item.options[k], "image": image} for k in "ABCD"]
        torch_scores = []
        for ex in examples:
            batch = processor.collate_for_training([{**ex, "image": ev._decode_image(image) if image else None}],
                                                   append_eos=False)
            inputs = {k: torch.tensor(v) for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                logits = reference(**inputs).logits[0].double()
            logp = torch.log_softmax(logits, -1).numpy()
            labels = batch["labels"][0]
            answer = [t for t in range(1, len(labels)) if labels[t] != -100]
            torch_scores.append(np.array([logp[t - 1, labels[t]] for t in answer]))
        for a, b in zip(ours, torch_scores):
            np.testing.assert_allclose(a.logprob, b, rtol=1e-4, atol=1e-4)
        totals = [b.sum() for b in torch_scores]
        choice = option_choice(ours, req.item.options, req.item.answer)
        assert choice["option_acc"] == float("ABCD"[int(np.argmax(totals))] == req.item.answer)
        per_token = [b.mean() for b in torch_scores]
        correct = "ABCD".index(req.item.answer)
        wrong = [p for k, p in enumerate(per_token) if k != correct]
        assert choice["truth_ratio"] == pytest.approx(np.exp(np.mean(wrong) - per_token[correct]), rel=1e-3)
