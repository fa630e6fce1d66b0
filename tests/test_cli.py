"""The `vleraser` command end to end on a complete tiny checkpoint (weights + tokenizer + image processor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration as TorchLlava

from vleraser_jax import cli
from vleraser_jax.processing import load_processor

def test_inspect(full_checkpoint, capsys):
    assert cli.main(["inspect", str(full_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "model_type   llava" in out and "2 layers" in out


def test_convert_legacy_loads_in_torch(full_checkpoint, tmp_path):
    out = tmp_path / "legacy"
    assert cli.main(["convert", str(full_checkpoint), str(out), "--naming", "legacy"]) == 0
    _, info = TorchLlava.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()


def test_generate_matches_torch_on_the_same_processed_inputs(full_checkpoint, capsys):
    question = "Who is this person?"
    assert cli.main(
        ["generate", str(full_checkpoint), "--question", question, "--image", str(full_checkpoint / "face.png"),
         "--max-new-tokens", "8", "--attention", "reference"]
    ) == 0
    printed = capsys.readouterr().out.split("A: ", 1)[1].strip()
    processor = load_processor(full_checkpoint)
    batch = processor([processor.build_prompt(question)], images=[Image.open(full_checkpoint / "face.png").convert("RGB")])
    torch_model = TorchLlava.from_pretrained(full_checkpoint).eval()
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
