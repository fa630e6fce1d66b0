"""qwen2_vl_7b: Qwen/Qwen2-VL-7B-Instruct on MLLMU-Bench, sharded over a (data, fsdp, tensor) mesh.

Set `--config.model.checkpoint=/path/to/Qwen2-VL-7B-Instruct` and `--config.data.root=/path/to/MLLMU-Bench`.
`model.hf_config` holds the architecture numbers of the checkpoint's config.json (its flat layout, as
released), so `vleraser plan` needs no checkpoint:

    vleraser plan --config configs/qwen2_vl_7b.py --mesh 1x4x2 --device-memory 16
"""

import ml_collections

from vleraser_jax.parallel import DEFAULT_RULES


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "qwen2_vl_7b"
    c.family = "qwen2_vl"
    c.seed = 0
    c.work_dir = "runs"

    c.data = ml_collections.ConfigDict()
    c.data.source = "mllmu"
    c.data.root = ""  # the local MLLMU-Bench copy (set it)
    c.data.forget_ratio = 5

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # the local Qwen2-VL-7B-Instruct directory (set it)
    c.model.dtype = "bfloat16"
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

    # MLLMU-Bench's vanilla fine-tune: LoRA r16 α16, lr 2e-5, batch 4, 5 epochs on ft_Data.
    c.vanilla = ml_collections.ConfigDict()
    c.vanilla.lora_rank = 16
    c.vanilla.lora_alpha = 16
    c.vanilla.learning_rate = 2e-5
    c.vanilla.batch_size = 4
    c.vanilla.epochs = 5
    c.vanilla.max_length = 768  # 256 image tokens (448² image) + the QA text

    c.vl_eraser = ml_collections.ConfigDict()
    c.vl_eraser.rank = 16
    c.vl_eraser.alpha = 16.0
    c.vl_eraser.lambda_ = 0.5
    c.vl_eraser.ce_mode = "added"
    c.vl_eraser.steps = 100
    c.vl_eraser.batch_size = 4
    c.vl_eraser.learning_rate = 2e-5
    c.vl_eraser.warmup_steps = 0
    c.vl_eraser.max_length = 768

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.max_people = 0
    c.eval.few_shot_people = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = DEFAULT_RULES

    c.plan = ml_collections.ConfigDict()
    c.plan.retained_rank = 475
    c.plan.image_size = 448  # one 448x448 image per row: 32x32 patches, 256 merged tokens
    c.plan.generate_batch = 16
    c.plan.prompt_length = 384
    c.plan.max_new_tokens = 50
    c.plan.frozen_dtype = ""  # "": f32 master weights; "bfloat16": the frozen base in bf16 (only the LoRA trains)
    c.plan.device_memory_gb = 0.0
    return c
