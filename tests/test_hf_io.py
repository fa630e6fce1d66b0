"""Checkpoint import/export: round trips through torch, legacy names, sharding, and clear errors."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from conftest import llava_inputs
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from transformers import LlavaForConditionalGeneration as TorchLlava

from vleraser_jax.checkpoints import INDEX_NAME, LLAVA_TABLE, CheckpointError, load_pretrained, save_pretrained
from vleraser_jax.models.configs import ConfigError

# llava-1.5-7b-hf's on-disk names, written from canonical ones.
LEGACY = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def flat(params):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def torch_logits(model, ids, mask, pixels):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels)
        ).logits.numpy()


def copy_checkpoint(src, dst, rename=None, drop=(), edit=None):
    """Rewrite a single-file checkpoint tensor by tensor (for naming and corruption tests)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, value in tensors.items():
        if name in drop:
            continue
        out[rename(name) if rename else name] = value
    if edit:
        edit(out)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("naming", ["transformers", "legacy"])
def test_export_round_trip_through_torch(tiny_llava_dir, tmp_path, naming):
    path, torch_model = tiny_llava_dir
    _, params, config = load_pretrained(path)
    out = save_pretrained(params, config, tmp_path / "export", naming=naming)
    reloaded, info = TorchLlava.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, pixels = llava_inputs(np.random.default_rng(0), image_tokens=config.num_image_tokens)
    np.testing.assert_allclose(
        torch_logits(reloaded.eval(), ids, mask, pixels), torch_logits(torch_model, ids, mask, pixels), atol=1e-5, rtol=0
    )
    if naming == "legacy":
        names = load_file(str(out / "model.safetensors")).keys()
        assert any(n.startswith("language_model.model.layers.0.") for n in names)
        assert any(n.startswith("vision_tower.vision_model.encoder.") for n in names)


def test_tied_embeddings_export_has_no_lm_head(tmp_path):
    from conftest import make_torch_llava, tiny_llava_hf_config

    torch_model = make_torch_llava(tiny_llava_hf_config(tie_word_embeddings=True))
    torch_model.save_pretrained(tmp_path / "src")
    _, params, config = load_pretrained(tmp_path / "src")
    assert "lm_head" not in params["llm"]
    out = save_pretrained(params, config, tmp_path / "out")
    assert not any("lm_head" in n for n in load_file(str(out / "model.safetensors")))
    reloaded, info = TorchLlava.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.tie_word_embeddings


def test_legacy_named_checkpoint_loads_identically(tiny_llava_dir, tmp_path):
    path, _ = tiny_llava_dir
    _, params, _ = load_pretrained(path)

    def to_legacy(name):
        name = LLAVA_TABLE.canonical(name)
        for new, old in LEGACY:
            if name.startswith(new):
                return old + name[len(new):]
        return name

    def add_buffer(tensors):  # older CLIP checkpoints also carry this non-parameter buffer
        tensors["vision_tower.vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]

    legacy = copy_checkpoint(path, tmp_path / "legacy", rename=to_legacy, edit=add_buffer)
    names = load_file(str(legacy / "model.safetensors")).keys()
    assert "language_model.model.embed_tokens.weight" in names and "language_model.lm_head.weight" in names
    _, legacy_params, _ = load_pretrained(legacy)
    a, b = flat(params), flat(legacy_params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sharded_export_and_load(tiny_llava_dir, tmp_path):
    path, torch_model = tiny_llava_dir
    _, params, config = load_pretrained(path)
    out = save_pretrained(params, config, tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, params2, _ = load_pretrained(out)
    a, b = flat(params), flat(params2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    reloaded, info = TorchLlava.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    (out / index["weight_map"]["lm_head.weight"]).unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        load_pretrained(out)


def test_export_is_atomic_and_keeps_previous_output(tiny_llava_dir, tmp_path):
    path, _ = tiny_llava_dir
    _, params, config = load_pretrained(path)
    out = save_pretrained(params, config, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["llm"]["norm"]["scale"] = bad["llm"]["norm"]["scale"].at[0].set(np.nan)
    with pytest.raises(CheckpointError, match="NaN"):
        save_pretrained(bad, config, tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp directories left behind


def test_missing_tensor_is_named(tiny_llava_dir, tmp_path):
    path, _ = tiny_llava_dir
    name = "language_model.model.layers.1.mlp.down_proj.weight"
    broken = copy_checkpoint(path, tmp_path / "ck", drop=(name,))
    with pytest.raises(CheckpointError, match=r"missing.*model\.language_model\.layers\.1\.mlp\.down_proj\.weight"):
        load_pretrained(broken)


def test_unexpected_tensor_is_named(tiny_llava_dir, tmp_path):
    path, _ = tiny_llava_dir
    extra = lambda t: t.__setitem__("language_model.model.layers.7.mlp.down_proj.weight", np.zeros((48, 96), np.float32))
    broken = copy_checkpoint(path, tmp_path / "ck", edit=extra)
    with pytest.raises(CheckpointError, match=r"layers\.7\.mlp\.down_proj\.weight \(in model\.safetensors\)"):
        load_pretrained(broken)
    unknown = copy_checkpoint(path, tmp_path / "ck2", edit=lambda t: t.__setitem__("some.other.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="some.other.weight"):
        load_pretrained(unknown)


def test_misshaped_tensor_is_named(tiny_llava_dir, tmp_path):
    path, _ = tiny_llava_dir
    name = "language_model.model.layers.0.self_attn.k_proj.weight"
    broken = copy_checkpoint(path, tmp_path / "ck", edit=lambda t: t.__setitem__(name, np.zeros((8, 48), np.float32)))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\(8, 48\).*\(24, 48\)"):
        load_pretrained(broken)


def test_nan_tensor_is_refused(tiny_llava_dir, tmp_path):
    path, _ = tiny_llava_dir
    name = "multi_modal_projector.linear_1.bias"

    def poison(t):
        t[name] = t[name].copy()
        t[name][0] = np.inf

    with pytest.raises(CheckpointError, match="linear_1.bias.*NaN or Inf"):
        load_pretrained(copy_checkpoint(path, tmp_path / "ck", edit=poison))


def test_pickled_only_and_bad_config_are_refused(tiny_llava_dir, tmp_path):
    path, _ = tiny_llava_dir
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not opened")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_pretrained(pickled)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        load_pretrained(unknown)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    shutil.copy(path / "config.json", truncated / "config.json")
    data = (path / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(truncated)
