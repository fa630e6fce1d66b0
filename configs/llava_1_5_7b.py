"""llava_1_5_7b: llava-hf/llava-1.5-7b-hf on MLLMU-Bench, sharded over a (data, fsdp, tensor) mesh.

Set `--config.model.checkpoint=/path/to/llava-1.5-7b-hf` (a local HF directory) and
`--config.data.root=/path/to/MLLMU-Bench` (local parquet copy). `model.hf_config` holds the architecture
numbers of the checkpoint's config.json so that `vleraser plan` needs no checkpoint:

    vleraser plan --config configs/llava_1_5_7b.py --mesh 1x4x2 --device-memory 16
"""

import ml_collections

from vleraser_jax.config import add_mllmu_7b_sections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "llava_1_5_7b"
    c.family = "llava"
    c.seed = 0
    c.work_dir = "runs"

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # the local llava-1.5-7b-hf directory (set it)
    c.model.dtype = "bfloat16"  # compute
    # loaded weights held in bf16: only LoRAs train (f32), so f32 copies of 7B frozen weights would be 27 GB for
    # nothing (`vleraser plan`: stage 1 then fits one 80 GB GPU); full-parameter training keeps f32 masters
    c.model.frozen_dtype = "bfloat16"
    c.model.attention = "cudnn"  # GPUs: cuDNN flash attention; use "xla" on TPU / CPU
    c.model.remat = "full"  # decoder layers recomputed in the backward pass
    # llava-hf/llava-1.5-7b-hf config.json (Vicuna-7B v1.5 + CLIP ViT-L/14-336).
    c.model.hf_config = {
        "model_type": "llava",
        "image_token_index": 32000,
        "image_seq_length": 576,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
            "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        },
    }

    # 576 image tokens (336² image, patch 14) + the text; generation prompts: image + question and options.
    c = add_mllmu_7b_sections(c, max_length=1024, image_size=336, prompt_length=640)
    c.eval.few_shot_people = 2  # eval.py prepends two exemplar people's solved items for LLaVA
    return c
