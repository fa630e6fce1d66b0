"""vleraser_jax.processing against transformers' LlavaProcessor, on a tiny local checkpoint."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vleraser_jax import processing as P
from vleraser_jax.data.synthetic import train_tokenizer

SENTENCES = [
    "USER: What is the name of the person in the image?\nASSISTANT: Her name is Alice Smith.",
    "USER: Where was this person born?\nASSISTANT: He was born in Springfield in 1970.",
    "The quick brown fox jumps over the lazy dog.",
    "Alice Smith works as a marine biologist and lives near the coast.",
    "Bob Jones is a painter; his favourite colour is blue.",
    "Question: Which city? A: Paris B: Rome C: Oslo D: Lima. Correct Answer: B",
] * 4
PROMPT_A = P.build_llava_prompt("What is the name of the person in the image?")
PROMPT_B = P.build_llava_prompt("Where was this person born? Answer in one sentence.")


def _image(seed, h, w):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(SENTENCES, d, vocab_size=400)
    return d


def _make_ckpt(root: Path, tok_dir: Path, strategy: str, image_size=28, crop=None):
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.save_pretrained(root)
    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=14, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )
    LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy,
    ).save_pretrained(root)
    P.write_image_processor_config(root, crop or image_size)
    return root


@pytest.fixture(scope="module", params=["default", "full"])
def ckpt(request, tmp_path_factory, tok_dir):
    return _make_ckpt(tmp_path_factory.mktemp(f"llava_{request.param}"), tok_dir, request.param), request.param


def _reference(ckpt_dir, strategy):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(ckpt_dir),
        tokenizer=AutoTokenizer.from_pretrained(ckpt_dir),
        patch_size=14,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )


def _rows(ids, mask):
    return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_specials(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    tok = train_tokenizer(SENTENCES, tmp_path / "a", vocab_size=400)
    again = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.get_vocab() == again.get_vocab()
    text = "USER: <image>\nWho is Alice?\nASSISTANT: Alice Smith<image>x"
    assert tok(text)["input_ids"] == again(text)["input_ids"]
    # Ids are fixed; <image> is one id, never split, even glued to text.
    assert [again.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")] == [0, 1, 2, 3, 4]
    ids = again(text)["input_ids"]
    assert ids[0] == again.bos_token_id and ids[-1] != again.eos_token_id
    assert ids.count(4) == 2 and again.encode("<image>", add_special_tokens=False) == [4]
    assert (again.bos_token, again.eos_token, again.pad_token, again.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert again.decode(ids, skip_special_tokens=True) == text.replace("<image>", "")
    assert len(again) == 400
    # Deterministic: same texts, same files.
    a = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    b = json.loads((tok_dir / "tokenizer.json").read_text())
    assert a["model"] == b["model"]


def test_prompt_answer_boundary_is_consistent(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    for q, a in [("Who?", "Alice Smith."), ("Which city?", "(B) Rome"), ("Born?", "1970, Springfield")]:
        p = P.build_llava_prompt(q)
        pi = tok(p)["input_ids"]
        assert tok(f"{p} {a}")["input_ids"] == pi + tok(f" {a}", add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- images


def test_image_processor_config(tmp_path):
    from transformers import CLIPImageProcessorPil

    path = P.write_image_processor_config(tmp_path, 28)
    assert path.name == "preprocessor_config.json"
    ip = CLIPImageProcessorPil.from_pretrained(tmp_path)
    colour = np.array([200, 100, 50], np.uint8)
    img = Image.fromarray(np.broadcast_to(colour, (40, 60, 3)).copy())
    pv = ip([img, _image(0, 17, 90)], return_tensors="np")["pixel_values"]
    assert pv.shape == (2, 3, 28, 28) and pv.dtype == np.float32
    want = (colour / 255.0 - np.array(P.CLIP_MEAN)) / np.array(P.CLIP_STD)
    np.testing.assert_allclose(pv[0], np.broadcast_to(want[:, None, None], (3, 28, 28)), atol=1e-5)


# ----------------------------------------------------------------------------- processor


def test_build_prompt():
    assert P.build_llava_prompt("Who?") == "USER: <image>\nWho?\nASSISTANT:"
    assert P.build_llava_prompt("Who?", with_image=False) == "USER: Who?\nASSISTANT:"


def test_call_matches_llava_processor(ckpt):
    ckpt_dir, strategy = ckpt
    proc = P.load_processor(ckpt_dir)
    n = 4 if strategy == "default" else 5
    assert proc.num_image_tokens == n
    images = [_image(1, 50, 30), _image(2, 20, 64)]
    texts = [PROMPT_A, PROMPT_B]
    ref = _reference(ckpt_dir, strategy)(text=texts, images=images, padding=True, return_tensors="np")
    for side in ("left", "right"):
        out = proc(texts, images, padding_side=side)
        assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
        assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
        assert out["pixel_values"].dtype == np.float32 and out["pixel_values"].shape == (2, 3, 28, 28)
        np.testing.assert_allclose(out["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
        assert _rows(out["input_ids"], out["attention_mask"]) == _rows(ref["input_ids"], ref["attention_mask"])
        assert ((out["input_ids"] == proc.image_token_id).sum(1) == n).all()
        mask = out["attention_mask"]
        short = int(np.argmin(mask.sum(1)))
        assert mask[short].sum() < mask.shape[1]
        pad_at = 0 if side == "left" else -1
        assert mask[short, pad_at] == 0 and out["input_ids"][short, pad_at] == proc.pad_token_id
        assert mask[1 - short].all()


def test_call_text_only_and_multi_image(ckpt):
    ckpt_dir, strategy = ckpt
    proc = P.load_processor(ckpt_dir)
    out = proc([proc.build_prompt("Who is Alice?", with_image=False)])
    assert set(out) == {"input_ids", "attention_mask"}
    assert not (out["input_ids"] == proc.image_token_id).any()
    # Few-shot style: two images in one prompt, plus a text-only row in the same batch.
    texts = ["USER: <image>\nWho?\nCorrect Answer: A\n" + PROMPT_A, P.build_llava_prompt("Who?", False)]
    images = [_image(3, 30, 30), _image(4, 30, 40)]
    out = proc(texts, images)
    ref = _reference(ckpt_dir, strategy)(text=texts, images=images, padding=True, return_tensors="np")
    assert out["pixel_values"].shape == (2, 3, 28, 28)
    assert _rows(out["input_ids"], out["attention_mask"]) == _rows(ref["input_ids"], ref["attention_mask"])
    assert (out["input_ids"] == proc.image_token_id).sum(1).tolist() == [2 * proc.num_image_tokens, 0]
    with pytest.raises(ValueError, match="image"):
        proc([PROMPT_A])
    with pytest.raises(TypeError, match="PIL"):
        proc([PROMPT_A], ["http://example.com/x.png"])


def test_decode(ckpt):
    proc = P.load_processor(ckpt[0])
    ids = proc([PROMPT_A + " Alice"], [_image(0, 28, 28)])["input_ids"]
    assert proc.decode(ids[0]) == PROMPT_A.replace("<image>", "") + " Alice"
    assert proc.batch_decode(np.concatenate([ids, ids])) == [proc.decode(ids[0])] * 2
    assert proc.decode([-100, -100] + ids[0].tolist()) == proc.decode(ids[0])


# ----------------------------------------------------------------------------- collation


def test_collate_labels_and_reference(ckpt):
    ckpt_dir, strategy = ckpt
    proc = P.load_processor(ckpt_dir)
    examples = [
        {"prompt": PROMPT_A, "answer": "Her name is Alice Smith.", "image": _image(5, 40, 30)},
        {"prompt": PROMPT_B, "answer": "In Springfield.", "image": _image(6, 30, 70)},
    ]
    ref = _reference(ckpt_dir, strategy)(
        text=[f"{e['prompt']} {e['answer']}" for e in examples],
        images=[e["image"] for e in examples], padding=True, return_tensors="np",
    )
    ref_rows = _rows(ref["input_ids"], ref["attention_mask"])
    seqs = {}
    for side in ("right", "left"):
        b = proc.collate_for_training(examples, padding_side=side)
        assert set(b) == {"input_ids", "attention_mask", "labels", "pixel_values"}
        assert all(b[k].dtype == np.int32 for k in ("input_ids", "attention_mask", "labels"))
        np.testing.assert_allclose(b["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
        rows = _rows(b["input_ids"], b["attention_mask"])
        # Same tokens as LlavaProcessor on the joined text, plus the eos we append.
        assert [r[:-1] for r in rows] == ref_rows and all(r[-1] == proc.eos_token_id for r in rows)
        seqs[side] = rows
        labels, mask, ids = b["labels"], b["attention_mask"], b["input_ids"]
        assert (labels[mask == 0] == -100).all()
        assert (labels[ids == proc.image_token_id] == -100).all()
        for r, ex in enumerate(examples):
            sup = labels[r] != -100
            # Supervised tokens are one contiguous run, ending at eos, equal to input_ids there.
            pos = np.flatnonzero(sup)
            assert (np.diff(pos) == 1).all() and (labels[r, sup] == ids[r, sup]).all()
            assert labels[r, pos[-1]] == proc.eos_token_id
            assert proc.decode(labels[r]).strip() == ex["answer"]
            # Everything before the answer is the prompt as generation would see it.
            prompt_row = proc([ex["prompt"]], [ex["image"]])["input_ids"][0].tolist()
            assert rows[r][: pos[0] - (0 if side == "right" else len(ids[r]) - len(rows[r]))] == prompt_row
    assert seqs["right"] == seqs["left"]


def test_collate_options_mixed_and_truncation(ckpt):
    proc = P.load_processor(ckpt[0])
    n = proc.num_image_tokens
    ex_img = {"prompt": PROMPT_A, "answer": "Her name is Alice Smith.", "image": _image(7, 30, 30)}
    ex_txt = {"prompt": proc.build_prompt("Who is Alice?", with_image=False), "answer": "A biologist."}

    b = proc.collate_for_training([ex_txt, ex_img, ex_txt], pad_to_multiple_of=8)
    assert b["pixel_values"].shape == (1, 3, 28, 28) and b["input_ids"].shape[1] % 8 == 0
    assert (b["input_ids"] == proc.image_token_id).sum(1).tolist() == [0, n, 0]
    assert "pixel_values" not in proc.collate_for_training([ex_txt])

    full = proc.collate_for_training([ex_img], mask_prompt=False, append_eos=False)
    lab, ids = full["labels"][0], full["input_ids"][0]
    assert (lab[ids == proc.image_token_id] == -100).all()
    assert ((lab == ids) == (ids != proc.image_token_id)).all() and ids[-1] != proc.eos_token_id

    base = proc.collate_for_training([ex_img])
    length = int(base["attention_mask"].sum())
    n_answer = int((base["labels"] != -100).sum())
    cut = proc.collate_for_training([ex_img], max_length=length - 2)
    assert cut["input_ids"].shape == (1, length - 2)
    assert (cut["input_ids"][0] == base["input_ids"][0, : length - 2]).all()
    assert int((cut["labels"] != -100).sum()) == n_answer - 2
    last_image = int(np.flatnonzero(base["input_ids"][0] == proc.image_token_id)[-1])
    with pytest.raises(ValueError, match="cut image tokens"):
        proc.collate_for_training([ex_img], max_length=last_image)
    with pytest.raises(ValueError, match="no answer tokens"):
        proc.collate_for_training([ex_img], max_length=length - n_answer)
    with pytest.raises(ValueError, match="0 '<image>' tag"):
        proc.collate_for_training([{**ex_txt, "image": _image(0, 9, 9)}])
    with pytest.raises(ValueError, match="1 '<image>' tag"):
        proc.collate_for_training([{k: v for k, v in ex_img.items() if k != "image"}])
    with pytest.raises(KeyError, match="answer"):
        proc.collate_for_training([{"prompt": "x"}])


# ----------------------------------------------------------------------------- loading errors


def test_load_processor_errors(tmp_path, tok_dir):
    good = _make_ckpt(tmp_path / "good", tok_dir, "default")

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    def edit_config(**fields):
        def f(d):
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(fields)
            (d / "config.json").write_text(json.dumps(cfg))
        return f

    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        P.load_processor(variant("no_pp", lambda d: (d / "preprocessor_config.json").unlink()))
    with pytest.raises(FileNotFoundError, match="config.json"):
        P.load_processor(variant("no_cfg", lambda d: (d / "config.json").unlink()))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        P.load_processor(
            variant("no_tok", lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")])
        )
    with pytest.raises(ValueError, match="model_type"):
        P.load_processor(variant("qwen", edit_config(model_type="qwen2_vl")))
    with pytest.raises(ValueError, match="image_token_index"):
        P.load_processor(variant("bad_tok", edit_config(image_token_index=40)))
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        P.load_processor(variant("bad_strategy", edit_config(vision_feature_select_strategy="cls")))
    with pytest.raises(ValueError, match="image_size"):
        P.load_processor(variant("bad_size", lambda d: P.write_image_processor_config(d, 42)))
    with pytest.raises(FileNotFoundError):
        P.load_processor(tmp_path / "missing")


# ----------------------------------------------------------------------------- torch-free


def test_runs_without_torch(ckpt):
    code = textwrap.dedent(
        f"""
        import sys
        import vleraser_jax.processing as P
        assert "torch" not in sys.modules, "importing processing imported torch"
        for name in ("torch", "torchvision"):
            sys.modules[name] = None  # find_spec -> None: transformers sees no torch
        import numpy as np
        from PIL import Image
        proc = P.load_processor({str(ckpt[0])!r})
        img = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
        out = proc([proc.build_prompt("Who?")], [img])
        b = proc.collate_for_training([{{"prompt": proc.build_prompt("Who?"), "answer": "Alice", "image": img}}])
        assert out["pixel_values"].shape == (1, 3, 28, 28) and b["labels"].shape == b["input_ids"].shape
        assert sys.modules["torch"] is None
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
