"""Qwen2VLProcessing against transformers' Qwen2VLProcessor, on a tiny local checkpoint; and end to end
into the Flax model."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vleraser_jax import processing as P

SENTENCES = [
    "What is the name of the person in the image? Her name is Alice Smith.",
    "Where was this person born? He was born in Springfield in 1970.",
    "You are a helpful assistant. system user assistant",
    "Alice Smith works as a marine biologist and lives near the coast.",
    "Question: Which city? A: Paris B: Rome C: Oslo D: Lima. Correct Answer: B",
] * 4
PATCH, MERGE = 4, 2


def _image(seed, h, w):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _rows(ids, mask):
    return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from qwen2_vl_helpers import write_tiny_qwen2_vl_dir

    return write_tiny_qwen2_vl_dir(tmp_path_factory.mktemp("qwen_proc"), SENTENCES, patch=PATCH, merge=MERGE)


def _reference(root):
    """transformers' Qwen2VLProcessor. Its video-processor slot needs torchvision even when empty, so the
    class check skips an absent (None) video processor; images and text take the stock code path."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class NoVideo(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    return NoVideo(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(root),
        tokenizer=AutoTokenizer.from_pretrained(root),
        chat_template=P.QWEN2_VL_CHAT_TEMPLATE,
    )


def _messages(question, with_image=True):
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def test_tokenizer_and_prompts(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    assert [tok.convert_tokens_to_ids(t) for t in P.QWEN2_VL_SPECIAL_TOKENS] == list(range(4, 10))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == P.QWEN2_VL_CHAT_TEMPLATE
    proc = P.load_processor(ckpt)
    assert isinstance(proc, P.Qwen2VLProcessing) and proc.image_token == "<|image_pad|>"
    ref = _reference(ckpt)
    for with_image in (True, False):
        prompt = proc.build_prompt("Who is this?", with_image)
        assert prompt == ref.apply_chat_template(_messages("Who is this?", with_image), add_generation_prompt=True)
    assert proc.build_prompt("Who?").endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Who?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_call_matches_qwen2_vl_processor(ckpt):
    proc = P.load_processor(ckpt)
    ref_proc = _reference(ckpt)
    second_image = "<|vision_end|>and <|vision_start|><|image_pad|><|vision_end|>"
    two = proc.build_prompt("Who?").replace("<|vision_end|>", second_image)
    texts = [proc.build_prompt("What is the name of the person in the image?"), proc.build_prompt("Who?", False), two]
    images = [_image(1, 50, 30), _image(2, 20, 64), _image(3, 33, 33)]
    for side in ("left", "right"):
        out = proc(texts, images, padding_side=side)
        ref = ref_proc(text=texts, images=images, padding=True, padding_side=side, return_tensors="np")
        assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
        assert all(out[k].dtype == np.int32 for k in ("input_ids", "attention_mask", "image_grid_thw"))
        np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
        np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])
        np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
        np.testing.assert_allclose(out["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    counts = proc.num_image_tokens(out["image_grid_thw"])
    assert (out["input_ids"] == proc.image_token_id).sum(1).tolist() == [counts[0], 0, counts[1] + counts[2]]
    assert len(set(map(tuple, out["image_grid_thw"].tolist()))) == 3  # three different sizes
    text_only = proc([proc.build_prompt("Who?", False)])
    assert set(text_only) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="image"):
        proc([texts[0]])
    with pytest.raises(TypeError, match="PIL"):
        proc([texts[0]], ["http://example.com/x.png"])


def test_collate_labels_and_reference(ckpt):
    proc = P.load_processor(ckpt)
    examples = [
        {"prompt": proc.build_prompt("Who is this?"), "answer": "Her name is Alice Smith.", "image": _image(5, 40, 30)},
        {"prompt": proc.build_prompt("Where was Alice born?", False), "answer": "In Springfield."},
        {"prompt": proc.build_prompt("Where?"), "answer": "Oslo.", "image": _image(6, 30, 70)},
    ]
    ref = _reference(ckpt)(
        text=[e["prompt"] + e["answer"] for e in examples],
        images=[e["image"] for e in examples if "image" in e], padding=True, return_tensors="np",
    )
    ref_rows = _rows(ref["input_ids"], ref["attention_mask"])
    seqs = {}
    for side in ("right", "left"):
        b = proc.collate_for_training(examples, padding_side=side)
        assert set(b) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"}
        np.testing.assert_allclose(b["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(b["image_grid_thw"], ref["image_grid_thw"])
        rows = _rows(b["input_ids"], b["attention_mask"])
        assert [r[:-1] for r in rows] == ref_rows and all(r[-1] == proc.eos_token_id for r in rows)
        seqs[side] = rows
        labels, ids = b["labels"], b["input_ids"]
        assert (labels[b["attention_mask"] == 0] == -100).all() and (labels[ids == proc.image_token_id] == -100).all()
        for r, ex in enumerate(examples):
            pos = np.flatnonzero(labels[r] != -100)
            assert (np.diff(pos) == 1).all() and labels[r, pos[-1]] == proc.eos_token_id
            assert proc.decode(labels[r]) == ex["answer"]
            prompt_row = proc([ex["prompt"]], [ex["image"]] if "image" in ex else None)["input_ids"][0].tolist()
            offset = 0 if side == "right" else len(ids[r]) - len(rows[r])
            assert rows[r][: pos[0] - offset] == prompt_row
    assert seqs["right"] == seqs["left"]
    with pytest.raises(ValueError, match=re.escape("1 '<|image_pad|>' tag")):
        proc.collate_for_training([{k: v for k, v in examples[0].items() if k != "image"}])
    n_answer = int((proc.collate_for_training(examples[:1])["labels"] != -100).sum())
    full = int(proc.collate_for_training(examples[:1])["attention_mask"].sum())
    with pytest.raises(ValueError, match="no answer tokens"):
        proc.collate_for_training(examples[:1], max_length=full - n_answer)


def test_processor_output_runs_the_flax_model_like_torch(ckpt, tmp_path):
    """Processor output goes straight into model.apply and matches transformers on the reference output."""
    import jax
    import torch
    from qwen2_vl_helpers import make_torch_qwen2_vl, max_rel
    from transformers import Qwen2VLConfig

    from vleraser_jax.checkpoints import load_pretrained

    torch_model = make_torch_qwen2_vl(Qwen2VLConfig.from_pretrained(ckpt))
    torch_model.save_pretrained(tmp_path)
    model, params, _ = load_pretrained(tmp_path)
    proc = P.load_processor(ckpt)
    texts = [proc.build_prompt("Who is this?"), proc.build_prompt("Where was Alice born?", False)]
    images = [_image(7, 36, 52)]
    logits = jax.jit(lambda p, inputs: model.apply({"params": p}, **inputs).logits)(params, proc(texts, images))
    ref_inputs = _reference(ckpt)(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        ref = torch_model(**ref_inputs).logits.numpy()
    valid = ref_inputs["attention_mask"].numpy().astype(bool)
    assert max_rel(np.asarray(logits)[valid], ref[valid]) < 1e-4


def test_load_processor_errors(ckpt, tmp_path):
    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in ckpt.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    def edit_config(**fields):
        def f(d):
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(fields)
            (d / "config.json").write_text(json.dumps(cfg))
        return f

    with pytest.raises(ValueError, match="patch_size=8"):
        P.load_processor(variant("bad_patch", lambda d: P.write_qwen2_vl_image_processor_config(d, patch_size=8)))
    with pytest.raises(ValueError, match="image_token_id=40"):
        P.load_processor(variant("bad_tok", edit_config(image_token_id=40)))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        P.load_processor(variant("no_pp", lambda d: (d / "preprocessor_config.json").unlink()))

    def drop_template(d):
        (d / "chat_template.jinja").unlink()
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))

    with pytest.raises(ValueError, match="chat template"):
        P.load_processor(variant("no_template", drop_template))
    with pytest.raises(ValueError, match="model_type"):
        P.load_processor(variant("clip_vision", edit_config(vision_config={"model_type": "clip_vision_model"})))


def test_runs_without_torch(ckpt):
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "torchvision"):
            sys.modules[name] = None  # find_spec -> None: transformers sees no torch
        import numpy as np
        from PIL import Image
        import vleraser_jax.processing as P
        proc = P.load_processor({str(ckpt)!r})
        img = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
        out = proc([proc.build_prompt("Who?")], [img])
        b = proc.collate_for_training([{{"prompt": proc.build_prompt("Who?"), "answer": "Alice", "image": img}}])
        assert out["pixel_values"].shape[1] == 3 * 2 * 4 * 4 and b["labels"].shape == b["input_ids"].shape
        assert sys.modules["torch"] is None
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
