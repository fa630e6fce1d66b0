"""The `vleraser` command end to end on a complete tiny checkpoint (weights + tokenizer + image processor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_torch_llava, tiny_llava_hf_config
from PIL import Image
from transformers import LlavaForConditionalGeneration as TorchLlava

from vleraser_jax import cli
from vleraser_jax.processing import load_processor, train_tokenizer, write_image_processor_config

CORPUS = [
    "USER: <image>\nWho is this person?\nASSISTANT: This is Mara Quill, a painter born in Oslo.",
    "USER: What does Tomas Reyd do?\nASSISTANT: Tomas Reyd is a marine biologist.",
    "The portrait shows a woman with red hair and round glasses.",
] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("full_ckpt")
    tokenizer = train_tokenizer(CORPUS, path, vocab_size=300)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    hf_config = tiny_llava_hf_config()
    hf_config.text_config.vocab_size = len(tokenizer)
    hf_config.image_token_index = image_id
    hf_config.text_config.eos_token_id = tokenizer.eos_token_id
    hf_config.text_config.pad_token_id = tokenizer.pad_token_id
    make_torch_llava(hf_config).save_pretrained(path)
    write_image_processor_config(path, image_size=28)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    image.save(path / "face.png")
    return path


def test_inspect(checkpoint, capsys):
    assert cli.main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "model_type   llava" in out and "2 layers" in out


def test_convert_legacy_loads_in_torch(checkpoint, tmp_path):
    out = tmp_path / "legacy"
    assert cli.main(["convert", str(checkpoint), str(out), "--naming", "legacy"]) == 0
    _, info = TorchLlava.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()


def test_generate_matches_torch_on_the_same_processed_inputs(checkpoint, capsys):
    question = "Who is this person?"
    assert cli.main(
        ["generate", str(checkpoint), "--question", question, "--image", str(checkpoint / "face.png"),
         "--max-new-tokens", "8", "--attention", "reference"]
    ) == 0
    printed = capsys.readouterr().out.split("A: ", 1)[1].strip()
    processor = load_processor(checkpoint)
    batch = processor([processor.build_prompt(question)], images=[Image.open(checkpoint / "face.png").convert("RGB")])
    torch_model = TorchLlava.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ref = torch_model.generate(
            **{k: torch.tensor(v) for k, v in batch.items()},
            max_new_tokens=8, do_sample=False, eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id,
        )
    expected = processor.decode(ref[0, batch["input_ids"].shape[1]:].tolist()).strip()
    assert expected and printed == expected


def test_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vleraser: error:") and "config.json" in err
