"""Tiny random Qwen2-VL reference models and batches (the torch side of the Qwen2-VL parity tests)."""

from __future__ import annotations

import numpy as np
import torch

IMAGE = 100  # image_token_id, inside the tiny vocab as in Qwen2-VL-7B (151655 < 152064)
VIDEO, VISION_START, VISION_END = 101, 102, 103
PATCH, TEMPORAL, MERGE = 4, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH


def tiny_qwen2_vl_hf_config(
    *,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    rope_parameters: dict | None = None,
    vision_act: str = "quick_gelu",
    vision_layers: int = 2,
):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        vision_config=dict(
            depth=vision_layers,
            embed_dim=32,
            hidden_size=48,
            num_heads=4,
            mlp_ratio=2,
            hidden_act=vision_act,
            patch_size=PATCH,
            temporal_patch_size=TEMPORAL,
            spatial_merge_size=MERGE,
        ),
        text_config=dict(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=num_key_value_heads,
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 3]},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=tie_word_embeddings,
    )


def make_torch_qwen2_vl(hf_config, seed: int = 0):
    """A random Qwen2VLForConditionalGeneration (see conftest.randomized)."""
    from conftest import randomized
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    return randomized(Qwen2VLForConditionalGeneration(hf_config), seed)


def qwen_batch(rng: np.random.Generator, rows, grids):
    """Left-padded prompts; `rows` lists, per row, (text lengths, image indices) as
    [n0, img, n1, img, n2, ...] (ints = random text runs, strings "i<k>" = image k of `grids`).

    Each image is wrapped in vision start/end tokens, as the chat template writes it. Images are
    numbered in reading order across the batch. Returns int64 ids/mask, f32 pixel_values, int64 grid.
    """
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    tokens = grids.prod(-1) // MERGE**2
    seqs = []
    for layout in rows:
        ids = []
        for item in layout:
            if isinstance(item, str):
                ids += [VISION_START] + [IMAGE] * int(tokens[int(item[1:])]) + [VISION_END]
            else:
                ids += list(rng.integers(3, 98, item))
        seqs.append(ids)
    length = max(len(s) for s in seqs)
    input_ids = np.zeros((len(seqs), length), np.int64)
    attention_mask = np.zeros((len(seqs), length), np.int64)
    for b, ids in enumerate(seqs):
        input_ids[b, length - len(ids):] = ids
        attention_mask[b, length - len(ids):] = 1
    pixel_values = rng.standard_normal((int(grids.prod(-1).sum()), PATCH_DIM)).astype(np.float32)
    return input_ids, attention_mask, pixel_values, grids


def torch_image_kwargs(ids, pixels, grid):
    """What transformers' Qwen2-VL needs besides ids/mask: pixels, grid and the processor's mm_token_type_ids."""
    if pixels is None:
        return {}
    return {
        "pixel_values": torch.tensor(pixels),
        "image_grid_thw": torch.tensor(grid),
        "mm_token_type_ids": torch.tensor((ids == IMAGE).astype(np.int64)),
    }


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def write_tiny_qwen2_vl_dir(root, sentences, *, patch: int, merge: int, weights: bool = False):
    """A local Qwen2-VL checkpoint directory: a tokenizer trained on `sentences`, the tiny config with its special
    token ids, the image processor's config and, with `weights`, random torch weights (`make_torch_qwen2_vl`)."""
    from vleraser_jax import processing as P
    from vleraser_jax.data.synthetic import train_qwen2_vl_tokenizer

    tok = train_qwen2_vl_tokenizer(sentences, root, vocab_size=400)
    hf = tiny_qwen2_vl_hf_config()
    hf.text_config.vocab_size = len(tok)
    hf.text_config.eos_token_id = tok.eos_token_id
    hf.text_config.pad_token_id = tok.pad_token_id
    hf.image_token_id = tok.convert_tokens_to_ids(P.QWEN2_VL_IMAGE_TOKEN)
    hf.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
    hf.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_start|>")
    hf.vision_end_token_id = tok.convert_tokens_to_ids("<|vision_end|>")
    if weights:
        make_torch_qwen2_vl(hf).save_pretrained(root)
    else:
        hf.save_pretrained(root)
    P.write_qwen2_vl_image_processor_config(root, patch_size=patch, merge_size=merge, min_pixels=8 * 8,
                                            max_pixels=48 * 48)
    return root
