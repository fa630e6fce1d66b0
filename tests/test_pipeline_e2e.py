"""`vleraser data synth` then `vleraser eval` on a tiny random LLaVA: the data → model → report path."""

from __future__ import annotations

import json
import shutil

from conftest import make_torch_llava, tiny_llava_hf_config

from vleraser_jax import cli


def test_synth_then_eval_writes_the_report(tmp_path, capsys):
    data, tok = tmp_path / "bench", tmp_path / "tok"
    assert cli.main(["data", "synth", "--out", str(data), "--people", "20", "--celebrities", "4",
                     "--image-size", "28", "--tokenizer", str(tok), "--vocab-size", "512"]) == 0
    info = json.loads((data / "synthetic_info.json").read_text())
    assert info["rows"]["forget_5"] == 1 and info["rows"]["Retain_Set"] == 4

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok))
    hf_config = tiny_llava_hf_config()
    hf_config.text_config.vocab_size = len(tokenizer)
    hf_config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    hf_config.text_config.eos_token_id = tokenizer.eos_token_id
    hf_config.text_config.pad_token_id = tokenizer.pad_token_id
    ckpt = tmp_path / "ckpt"
    make_torch_llava(hf_config).save_pretrained(ckpt)
    for f in tok.iterdir():
        shutil.copy(f, ckpt / f.name)

    report = tmp_path / "report"
    assert cli.main(["eval", str(ckpt), "--data", str(data), "--out", str(report), "--method", "random",
                     "--max-people", "2", "--batch-size", "8", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "evaluated" in out and "| random |" in out
    results = json.loads((report / "results.json").read_text())["methods"]["random"]
    assert set(results) == {"forget", "test", "retain", "real"}
    assert results["forget"]["visual"]["classification"]["n"] == 8  # 1 forget person x 8 visual MC items
    assert (report / "report.md").exists() and (report / "sets_visual_cloze.png").exists()
    assert (report / "items-random.jsonl").exists()  # per-item scores, for paired comparisons later
    assert (report / "predictions_random.jsonl").read_text().count("\n") > 0
