"""PEFT adapters of our LoRAs, proven with peft and transformers: a tiny VL-Eraser run and a tiny NPO run export
adapters that `PeftModel.from_pretrained` loads on the vanilla torch model with no missing or unexpected keys,
whose tensors and config are what PEFT itself saves for that model, and whose merge with the stated weight gives
our exported unlearned checkpoint (weights to 1e-6, the same logits)."""

from __future__ import annotations

import io
import json
import re
import warnings
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open

from vleraser_jax import cli
from vleraser_jax.checkpoints import CheckpointError, load_pretrained
from vleraser_jax.checkpoints.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGE_FILE, save_peft_adapter
from vleraser_jax.experiment.artifacts import export_adapter, save_method_run
from vleraser_jax.experiment.methods import MethodRun

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("quick_compiles")  # conftest: compiles dominate these runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LLaVA (2 LM blocks), a 2-step VL-Eraser run (vacuum projector of rank 2, strength 0.7) and a
    2-step NPO run, each written by `save_method_run` (model/, artifacts/, adapter/)."""
    from conftest import tiny_llava_hf_config, write_full_checkpoint
    from PIL import Image

    from vleraser_jax.data.mllmu import TrainingRow
    from vleraser_jax.processing import load_processor
    from vleraser_jax.unlearn.baselines import unlearn_baseline
    from vleraser_jax.unlearn.trainer import RunSettings
    from vleraser_jax.unlearn.vl_eraser import VLEraserConfig, unlearn_vl_eraser

    root = tmp_path_factory.mktemp("peft")
    ckpt = write_full_checkpoint(root / "vanilla", tiny_llava_hf_config(vision_layers=1, vision_feature_layer=-1))
    model, params, _ = load_pretrained(ckpt)
    processor = load_processor(ckpt)

    def image(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    forget = (TrainingRow("f1", "Who is this person?", "This is Mara Quill.", image(0)),
              TrainingRow("f1", "What does this person do?", "A painter born in Oslo.", image(0)))
    retain = (TrainingRow("r1", "Who is this person?", "This is Tomas Reyd.", image(1)),
              TrainingRow("r2", "Who is this person?", "A woman with red hair.", image(2)))
    run = RunSettings(steps=2, batch_size=2, learning_rate=1e-2, warmup_steps=0, max_length=64, seed=0)
    quiet = dict(log=lambda *_: None)
    vle = unlearn_vl_eraser(model, params, processor, forget, retain,
                            VLEraserConfig(rank=2, threshold_mode="rank", retained_rank=2, deletion_strength=0.7),
                            run, entity_names={"f1": "Mara Quill"}, **quiet)
    npo = unlearn_baseline(model, params, processor, forget, retain, "npo", {"epochs": None}, run, progress=False,
                           **quiet)
    out = SimpleNamespace(ckpt=ckpt, root=root, vle=root / "vl_eraser", npo=root / "npo", params=params, model=model)
    unlearned, lora, projectors, info = vle
    save_method_run(out.vle, MethodRun("VL-Eraser", unlearned, info, lora, projectors), model.config, source_dir=ckpt)
    unlearned, lora, info = npo
    save_method_run(out.npo, MethodRun("NPO", unlearned, info, lora), model.config, source_dir=ckpt)
    out.vle_lora, out.vle_projectors, out.npo_lora = vle[1], vle[2], lora
    return out


def torch_llava(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def load_peft(vanilla, adapter):
    """PeftModel.from_pretrained, failing on any warning PEFT raises (unexpected config keys, missing keys)."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(vanilla, str(adapter))
    from_peft = [str(w.message) for w in caught if "/peft/" in w.filename.replace("\\", "/")]
    assert not from_peft, from_peft
    return model


def readme_code(adapter) -> str:
    """The Python block of the adapter's README.md, pointed at this adapter."""
    text = (adapter / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    return code.replace('"path/to/this/adapter"', repr(str(adapter)))


def logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits


@pytest.mark.parametrize("method, weight", [("vle", -0.7), ("npo", 1.0)])
def test_the_adapter_merged_with_its_weight_is_our_unlearned_checkpoint(runs, method, weight):
    run_dir = getattr(runs, method)
    adapter = run_dir / "adapter"
    assert json.loads((adapter / MERGE_FILE).read_text())["merge_weight"] == weight
    peft_model = load_peft(torch_llava(runs.ckpt), adapter)
    # no missing or unexpected keys: load the same files again as a second adapter and read PEFT's own result
    result = peft_model.load_adapter(str(adapter), adapter_name="again")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    peft_model.delete_adapter("again")
    # the README's lines, run as written: PeftModel.from_pretrained, rescale by the weight, merge_and_unload
    namespace = {"vanilla": torch_llava(runs.ckpt)}
    exec(readme_code(adapter), namespace)
    merged, ours = namespace["unlearned"], torch_llava(run_dir / "model")
    merged_sd, ours_sd = merged.state_dict(), ours.state_dict()
    assert set(merged_sd) == set(ours_sd)
    changed = 0
    vanilla_sd = torch_llava(runs.ckpt).state_dict()
    for name, tensor in ours_sd.items():
        np.testing.assert_allclose(merged_sd[name].numpy(), tensor.numpy(), rtol=0, atol=1e-6, err_msg=name)
        changed += not torch.equal(tensor, vanilla_sd[name])
    assert changed >= 2  # the unlearning moved weights: the comparison is not vanilla against vanilla
    ids = torch.tensor([[5, 7] + [merged.config.image_token_index] * 16 + [11, 13, 17]])
    pixels = torch.tensor(np.random.default_rng(0).standard_normal((1, 3, 28, 28)), dtype=torch.float32)
    torch.testing.assert_close(logits(merged, ids, pixels), logits(ours, ids, pixels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["vle", "npo"])
def test_tensor_names_and_config_are_what_peft_saves(runs, method, tmp_path):
    adapter = getattr(runs, method) / "adapter"
    peft_model = load_peft(torch_llava(runs.ckpt), adapter)
    peft_model.save_pretrained(str(tmp_path / "resaved"))  # PEFT's own writer, for the same model and adapter
    with safe_open(adapter / ADAPTER_WEIGHTS, "np") as ours, safe_open(tmp_path / "resaved" / ADAPTER_WEIGHTS,
                                                                           "np") as theirs:
        assert set(ours.keys()) == set(theirs.keys())
        for key in ours.keys():
            np.testing.assert_array_equal(ours.get_tensor(key), theirs.get_tensor(key), err_msg=key)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    resaved = json.loads((tmp_path / "resaved" / ADAPTER_CONFIG).read_text())
    for field in ("peft_type", "r", "lora_alpha", "bias", "use_dora", "use_rslora", "fan_in_fan_out", "auto_mapping"):
        assert config[field] == resaved[field], field
    assert sorted(config["target_modules"]) == sorted(resaved["target_modules"])
    expected = {"vle": {f"model.language_model.layers.{i}.mlp.down_proj" for i in range(2)},
                "npo": {f"model.language_model.layers.{i}.{p}" for i in range(2) for p in
                        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
                | {f"model.vision_tower.encoder.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")}}[method]
    assert set(config["target_modules"]) == expected  # NPO: MLLMU-Bench's PEFT targets, CLIP's q/k/v too
    assert (config["r"], config["lora_alpha"]) == {"vle": (2, 16), "npo": (16, 16)}[method]
    assert config["base_model_name_or_path"] == str(runs.ckpt.absolute())


def test_the_vacuum_projector_is_folded_into_a(runs):
    """lora_A = A P: the adapter's rows have no component along the retained basis U (P = I − U Uᵀ)."""
    basis = np.asarray(runs.vle_projectors["llm"]["layers_0"]["mlp"]["down_proj"]["basis"])
    with safe_open(runs.vle / "adapter" / ADAPTER_WEIGHTS, "np") as f:
        a = f.get_tensor("base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight")
    raw = np.asarray(runs.vle_lora["llm"]["layers_0"]["mlp"]["down_proj"]["a"]).T
    assert np.abs(raw @ basis).max() > 1e-3  # the trained A has retained directions ...
    np.testing.assert_allclose(a @ basis, 0.0, atol=1e-6)  # ... the exported one none
    np.testing.assert_allclose(a, raw - (raw @ basis) @ basis.T, rtol=1e-5, atol=1e-7)


def test_export_adapter_command_rewrites_the_same_files(runs, tmp_path, capsys):
    assert cli.main(["export-adapter", str(runs.vle), str(tmp_path / "out")]) == 0
    assert "wrote the PEFT adapter" in capsys.readouterr().out
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGE_FILE, "README.md"):
        assert (tmp_path / "out" / name).read_bytes() == (runs.vle / "adapter" / name).read_bytes(), name


def test_full_parameter_runs_and_bad_trees_are_refused_clearly(runs, tmp_path, capsys):
    mm = tmp_path / "mmunlearner"
    save_method_run(mm, MethodRun("MMUnlearner", runs.params, {"title": "MMUnlearner"}), runs.model.config,
                    source_dir=runs.ckpt)
    assert not (mm / "adapter").exists()
    assert cli.main(["export-adapter", str(mm), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "MMUnlearner trained the model's own parameters, not a LoRA" in err and "no adapter" in err
    with pytest.raises(CheckpointError, match="not a method run directory"):
        export_adapter(tmp_path / "nothing", tmp_path / "out")
    config = runs.model.config
    bad = jax.tree_util.tree_map(lambda x: x, runs.npo_lora)
    bad["llm"]["layers_0"]["mlp"]["down_proj"]["a"] = bad["llm"]["layers_0"]["mlp"]["down_proj"]["a"][:5]
    with pytest.raises(CheckpointError, match="layers_0/mlp/down_proj.*do not factor"):
        save_peft_adapter(tmp_path / "bad", bad, config)
    bad = jax.tree_util.tree_map(lambda x: x * np.nan, runs.npo_lora)
    with pytest.raises(CheckpointError, match="NaN"):
        save_peft_adapter(tmp_path / "bad", bad, config)
    assert not (tmp_path / "bad").exists()


def test_the_readme_lines_reproduce_the_unlearned_checkpoint(runs):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- peft-merge[^>]*-->\n```python\n(.*?)```", readme, re.S).group(1)
    for run_dir in (runs.vle, runs.npo):
        namespace = {"vanilla_dir": str(runs.ckpt), "run_dir": str(run_dir)}
        exec(code, namespace)
        ours = torch_llava(run_dir / "model").state_dict()
        merged = namespace["unlearned"].state_dict()
        assert set(merged) == set(ours)
        for name, tensor in ours.items():
            np.testing.assert_allclose(merged[name].numpy(), tensor.numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_a_qwen2_vl_deletion_as_an_adapter(tmp_path):
    """The same contract on Qwen2-VL, for a random LoRA behind a random vacuum basis (no training needed)."""
    from peft.helpers import rescale_adapter_scale
    from qwen2_vl_helpers import make_torch_qwen2_vl, tiny_qwen2_vl_hf_config
    from transformers import Qwen2VLForConditionalGeneration

    from vleraser_jax.checkpoints import save_pretrained
    from vleraser_jax.unlearn import lora as lora_lib

    make_torch_qwen2_vl(tiny_qwen2_vl_hf_config()).save_pretrained(tmp_path / "vanilla")
    _, params, config = load_pretrained(tmp_path / "vanilla")
    lora = lora_lib.init(params, 2, 3.0, jax.random.PRNGKey(0), b_std=0.05)
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((96, 3)))[0].astype(np.float32)
    projectors = {"llm": {f"layers_{i}": {"mlp": {"down_proj": {"basis": basis}}} for i in range(2)}}
    save_pretrained(lora_lib.merge(params, lora, projectors, sign=-1.5), config, tmp_path / "unlearned")
    save_peft_adapter(tmp_path / "adapter", lora, config, projectors, merge_weight=-1.5)
    model = load_peft(Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "vanilla")).eval(),
                      tmp_path / "adapter")
    with rescale_adapter_scale(model, -1.5):
        merged = model.merge_and_unload().state_dict()
    ours = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "unlearned")).state_dict()
    assert set(merged) == set(ours)
    for name, tensor in ours.items():
        np.testing.assert_allclose(merged[name].numpy(), tensor.numpy(), rtol=0, atol=1e-6, err_msg=name)
