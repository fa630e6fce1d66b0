"""Shared fixtures: tiny *random* PyTorch transformers models saved as local checkpoints (the reference)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CLI calls in tests would turn JAX's process-wide compilation cache on in one test's tmp dir for every later test
# (tests/test_compile_cache.py checks the cache in fresh processes of its own)
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

IMAGE_TOKEN = 99  # inside the tiny vocab, as in llava-1.5-7b-hf (32000 < 32064)


def tiny_llava_hf_config(
    *,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    vision_feature_layer=-2,
    vision_feature_select_strategy: str = "default",
    vision_layers: int = 2,
    rope_parameters: dict | None = None,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    projector_bias: bool = True,
):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=64,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    num_patches = (28 // 7) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=num_patches + (1 if vision_feature_select_strategy == "full" else 0),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        multimodal_projector_bias=projector_bias,
        tie_word_embeddings=tie_word_embeddings,
    )


@pytest.fixture(scope="module")
def quick_compiles():
    """XLA compiles dominate a module of tiny runs: skip the backend's optimisation passes (LLVM -O0, numerics
    unchanged) for that module only, then restore the setting. Use: `pytestmark = pytest.mark.usefixtures(...)`."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def randomized(model, seed: int = 0, norm_markers=("norm", "layrnorm", "ln_q")):
    """Give a freshly built torch model random weights with non-trivial norms and biases (HF inits
    them to 1 and 0, which would hide layout mistakes), in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(m in name for m in norm_markers):
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def make_torch_llava(hf_config, seed: int = 0):
    """A random LlavaForConditionalGeneration (see `randomized`)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return randomized(LlavaForConditionalGeneration(hf_config), seed)


def torch_generate_new_tokens(torch_model, ids, mask, max_new_tokens, eos, **image_inputs):
    """transformers' greedy generate; returns only the new tokens (numpy)."""
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            **image_inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[:, ids.shape[1]:].numpy()


def trim_at_eos(row, eos):
    row = list(row)
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """The default tiny LLaVA (GQA, untied, feature layer -2), saved by transformers."""
    model = make_torch_llava(tiny_llava_hf_config())
    path = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(path)
    return path, model


def llava_inputs(rng: np.random.Generator, text_lens=(6, 6), with_image=(True, True), image_tokens: int = 16,
                 image_size: int = 28):
    """Random left-padded prompts (vocab ids 3..98); rows with an image carry one image-token block."""
    rows = []
    for n, image in zip(text_lens, with_image):
        ids = list(rng.integers(3, 98, n))
        rows.append(ids[:2] + [IMAGE_TOKEN] * image_tokens + ids[2:] if image else ids)
    length = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), length), np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids):] = ids
        attention_mask[b, length - len(ids):] = 1
    pixel_values = rng.standard_normal((sum(with_image), 3, image_size, image_size)).astype(np.float32)
    return input_ids, attention_mask, pixel_values


def positions_like_ours(attention_mask: np.ndarray) -> np.ndarray:
    """The position ids our models derive from a mask (cumsum - 1, clamped); torch gets them explicitly."""
    return np.maximum(np.cumsum(attention_mask, -1) - 1, 0)


CORPUS = [
    "USER: <image>\nWho is this person?\nASSISTANT: This is Mara Quill, a painter born in Oslo.",
    "USER: What does Tomas Reyd do?\nASSISTANT: Tomas Reyd is a marine biologist.",
    "The portrait shows a woman with red hair and round glasses.",
] * 20


def write_full_checkpoint(path, hf_config=None, lm_layers: int | None = None):
    """Write a complete tiny LLaVA directory at `path` (random weights, a tokenizer trained on CORPUS, an image
    processor) from `hf_config` (default `tiny_llava_hf_config()`); returns the path."""
    from vleraser_jax.data.synthetic import train_tokenizer
    from vleraser_jax.processing import write_image_processor_config

    tokenizer = train_tokenizer(CORPUS, path, vocab_size=300)
    hf_config = hf_config or tiny_llava_hf_config()
    if lm_layers is not None:
        hf_config.text_config.num_hidden_layers = lm_layers
    hf_config.text_config.vocab_size = len(tokenizer)
    hf_config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    hf_config.text_config.eos_token_id = tokenizer.eos_token_id
    hf_config.text_config.pad_token_id = tokenizer.pad_token_id
    make_torch_llava(hf_config).save_pretrained(path)
    write_image_processor_config(path, image_size=28)
    return path


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory):
    """A complete tiny LLaVA directory: random weights, a trained tokenizer, an image processor, an image."""
    from PIL import Image

    path = write_full_checkpoint(tmp_path_factory.mktemp("full_ckpt"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    image.save(path / "face.png")
    return path
