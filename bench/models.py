"""Shared setup for the JAX-vs-PyTorch benchmark: model sizes, one checkpoint loaded by both sides,
and the inputs (batch, LoRA init, vacuum projectors) both sides start from.

Weights are identical by construction: a random transformers `LlavaForConditionalGeneration` is saved with
`save_pretrained` and loaded into JAX with `vleraser_jax.checkpoints.load_pretrained` (as tests/conftest.py does).
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_TOKEN = 99
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    # vision tower (CLIP)
    v_hidden: int
    v_inter: int
    v_layers: int
    v_heads: int
    image: int
    patch: int
    # language model (Llama)
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    # one training batch
    batch: int
    text_tokens: int  # text tokens per row around the image block
    # generation
    gen_prompt_text: int = 8
    gen_new_tokens: int = 32
    # VL-Eraser / NPO
    rank: int = 8
    retained: int = 8  # vacuum basis columns per block (k < d_ff / 2: the compact form)

    @property
    def image_tokens(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def seq_len(self) -> int:
        return self.image_tokens + self.text_tokens


SIZES = {
    # tests/conftest.py's tiny LLaVA
    "tiny": Size("tiny", 32, 64, 2, 4, 28, 7, 48, 96, 2, 4, 2, 101, batch=2, text_tokens=16, retained=8),
    # ~120M parameters (LM ~110M incl. a 16k vocabulary, CLIP ~11M)
    "small": Size("small", 384, 1536, 6, 6, 112, 16, 768, 2048, 12, 12, 12, 16000, batch=2, text_tokens=79,
                  retained=32),
    # ~1B (TinyLlama-like LM, CLIP-B/16-like tower)
    "1b": Size("1b", 768, 3072, 12, 12, 112, 16, 2048, 5632, 16, 16, 16, 32000, batch=1, text_tokens=79,
               retained=64),
}


def hf_config(size: Size):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=size.v_hidden, intermediate_size=size.v_inter,
                              num_hidden_layers=size.v_layers, num_attention_heads=size.v_heads,
                              image_size=size.image, patch_size=size.patch, projection_dim=16)
    text = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.inter,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads, max_position_embeddings=512,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                       image_seq_length=size.image_tokens, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", tie_word_embeddings=False)


def build_checkpoint(size: Size, path, seed: int = 0):
    """A random torch LLaVA saved at `path`; returns the torch model (eval mode, f32).

    Weights ~ N(0, 0.02) (HF-like scale, so activations stay sane over 12-16 blocks); norms perturbed from 1
    so a layout mistake cannot hide."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layrnorm" in name:
                p.add_(0.05 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0.0, 0.08 if size.name == "tiny" else 0.02)
    model.eval()
    model.save_pretrained(path)
    return model


def make_batch(size: Size, seed: int = 0, pad_last: int = 0) -> dict[str, np.ndarray]:
    """One training batch: [2 text] [image block] [text], labels on the last half of the text (the answer).

    pad_last: right-pad the last row by that many tokens (the collator's layout), to test masking."""
    rng = np.random.default_rng(seed)
    b, t = size.batch, size.seq_len
    ids = rng.integers(3, min(size.vocab, 98) if size.vocab <= 101 else size.vocab, (b, t)).astype(np.int32)
    ids[ids == IMAGE_TOKEN] = 3
    ids[:, 2:2 + size.image_tokens] = IMAGE_TOKEN
    mask = np.ones((b, t), np.int32)
    if pad_last:
        ids[-1, t - pad_last:] = 0
        mask[-1, t - pad_last:] = 0
    labels = np.full((b, t), IGNORE_INDEX, np.int32)
    answer_start = 2 + size.image_tokens + size.text_tokens // 2
    labels[:, answer_start:] = ids[:, answer_start:]
    labels[mask == 0] = IGNORE_INDEX
    pixels = rng.standard_normal((b, 3, size.image, size.image)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def make_prompt(size: Size, seed: int = 1) -> dict[str, np.ndarray]:
    """One generation prompt (batch 1): [2 text] [image block] [text]."""
    rng = np.random.default_rng(seed)
    n = size.gen_prompt_text
    text = rng.integers(3, min(size.vocab, 98), n)
    text[text == IMAGE_TOKEN] = 3
    ids = np.concatenate([text[:2], np.full(size.image_tokens, IMAGE_TOKEN), text[2:]]).astype(np.int32)[None]
    pixels = rng.standard_normal((1, 3, size.image, size.image)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels}


def vle_projectors(size: Size, seed: int = 0) -> dict:
    """{"llm": {"layers_i": {"mlp": {"down_proj": {"basis": U [F, k]}}}}}: a random orthonormal U per
    block (what `vacuum.build_vacuum_projectors` stores when k < F/2; its values do not change the cost)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(size.layers):
        u, _ = np.linalg.qr(rng.standard_normal((size.inter, size.retained)))
        out[f"layers_{i}"] = {"mlp": {"down_proj": {"basis": u.astype(np.float32)}}}
    return {"llm": out}


def param_count(params) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


LM_LINEARS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
              "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def lora_tree_np(size: Size, modules=("mlp/down_proj",), seed: int = 0) -> dict:
    """A LoRA tree of the JAX layout (a [F_in, R], b [R, D_out], scale) without importing JAX: for the
    torch-only memory child, where only the shapes matter."""
    rng = np.random.default_rng(seed)
    head = size.hidden // size.heads
    dims = {"self_attn/q_proj": (size.hidden, size.heads * head), "self_attn/k_proj": (size.hidden, size.kv_heads * head),
            "self_attn/v_proj": (size.hidden, size.kv_heads * head), "self_attn/o_proj": (size.heads * head, size.hidden),
            "mlp/gate_proj": (size.hidden, size.inter), "mlp/up_proj": (size.hidden, size.inter),
            "mlp/down_proj": (size.inter, size.hidden)}
    out: dict = {"llm": {}}
    for i in range(size.layers):
        block: dict = {}
        for m in modules:
            f, d = dims[m]
            node = block
            for part in m.split("/"):
                node = node.setdefault(part, {})
            node.update(a=(rng.standard_normal((f, size.rank)) / np.sqrt(f)).astype(np.float32),
                        b=(1e-3 * rng.standard_normal((size.rank, d))).astype(np.float32), scale=np.float32(2.0))
        out["llm"][f"layers_{i}"] = block
    return out


def analytic_matmul_flops(size: Size, batch: int, seq: int) -> dict[str, float]:
    """Forward matmul FLOPs (2 per multiply-add) of the vision tower + projector and of the LM + head."""
    n_img = batch * size.image_tokens
    v_tok = (size.image // size.patch) ** 2 + 1
    head = size.hidden // size.heads
    vision = batch * 2 * v_tok * (size.v_layers * (4 * size.v_hidden ** 2 + 2 * size.v_hidden * size.v_inter)
                                  + 3 * size.patch ** 2 * size.v_hidden)
    vision += batch * size.v_layers * 4 * v_tok ** 2 * size.v_hidden
    vision += 2 * n_img * (size.v_hidden * size.hidden + size.hidden ** 2)
    tokens = batch * seq
    per_layer = 2 * size.hidden * size.heads * head + 2 * size.hidden * size.kv_heads * head + 3 * size.hidden * size.inter
    lm = 2 * tokens * (size.layers * per_layer + size.hidden * size.vocab)
    lm += batch * size.layers * 4 * seq ** 2 * size.hidden
    return {"vision": float(vision), "lm": float(lm)}
