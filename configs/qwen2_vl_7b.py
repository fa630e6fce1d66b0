"""qwen2_vl_7b: Qwen/Qwen2-VL-7B-Instruct on MLLMU-Bench, sharded over a (data, fsdp, tensor) mesh.

Set `--config.model.checkpoint=/path/to/Qwen2-VL-7B-Instruct` and `--config.data.root=/path/to/MLLMU-Bench`.
`model.hf_config` holds the architecture numbers of the checkpoint's config.json (its flat layout, as
released), so `vleraser plan` needs no checkpoint:

    vleraser plan --config configs/qwen2_vl_7b.py --mesh 1x4x2 --device-memory 16
"""

import ml_collections

from vleraser_jax.config import add_mllmu_7b_sections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "qwen2_vl_7b"
    c.family = "qwen2_vl"
    c.seed = 0
    c.work_dir = "runs"

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # the local Qwen2-VL-7B-Instruct directory (set it)
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"  # as llava_1_5_7b: only LoRAs train, frozen weights in the compute dtype
    c.model.attention = "cudnn"  # GPUs: cuDNN flash attention; use "xla" on TPU / CPU
    c.model.remat = "full"
    # Qwen/Qwen2-VL-7B-Instruct config.json.
    c.model.hf_config = {
        "model_type": "qwen2_vl",
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "use_sliding_window": False,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_config": {
            "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
    }

    # one 448x448 image per row: 32x32 patches, 256 merged tokens, + the text.
    c = add_mllmu_7b_sections(c, max_length=768, image_size=448, prompt_length=384)
    c.plan.retained_rank = 18944 // 2 - 1  # the most a compact vacuum basis holds at this FFN width
    return c
