"""llava_1_5_7b: llava-hf/llava-1.5-7b-hf on MLLMU-Bench, sharded over a (data, fsdp, tensor) mesh.

Set `--config.model.checkpoint=/path/to/llava-1.5-7b-hf` (a local HF directory) and
`--config.data.root=/path/to/MLLMU-Bench` (local parquet copy). `model.hf_config` holds the architecture
numbers of the checkpoint's config.json so that `vleraser plan` needs no checkpoint:

    vleraser plan --config configs/llava_1_5_7b.py --mesh 1x4x2 --device-memory 16
"""

import ml_collections

from vleraser_jax.parallel import DEFAULT_RULES


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "llava_1_5_7b"
    c.family = "llava"
    c.seed = 0
    c.work_dir = "runs"

    c.data = ml_collections.ConfigDict()
    c.data.source = "mllmu"
    c.data.root = ""  # the local MLLMU-Bench copy (set it)
    c.data.forget_ratio = 5

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # the local llava-1.5-7b-hf directory (set it)
    c.model.dtype = "bfloat16"  # compute; parameters stay f32 master weights
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

    # MLLMU-Bench's vanilla fine-tune: LoRA r16 α16, lr 2e-5, batch 4, 5 epochs on ft_Data.
    c.vanilla = ml_collections.ConfigDict()
    c.vanilla.lora_rank = 16
    c.vanilla.lora_alpha = 16
    c.vanilla.learning_rate = 2e-5
    c.vanilla.batch_size = 4
    c.vanilla.epochs = 5
    c.vanilla.max_length = 1024  # 576 image tokens + the QA text

    # VL-Eraser stage 1 (VLEraserConfig + StageOneConfig fields, read by unlearn.run.method_config).
    c.vl_eraser = ml_collections.ConfigDict()
    c.vl_eraser.rank = 16
    c.vl_eraser.alpha = 16.0
    c.vl_eraser.lambda_ = 0.5
    c.vl_eraser.ce_mode = "added"
    c.vl_eraser.steps = 100
    c.vl_eraser.batch_size = 4
    c.vl_eraser.learning_rate = 2e-5
    c.vl_eraser.warmup_steps = 0
    c.vl_eraser.max_length = 1024

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.max_people = 0
    c.eval.few_shot_people = 0

    # One mesh over every device: -1 fills. Override e.g. --config.mesh.fsdp=4 --config.mesh.tensor=2.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes (parallel.py)

    # Shapes `vleraser plan` compiles (stage 1 uses vl_eraser.batch_size / max_length).
    c.plan = ml_collections.ConfigDict()
    c.plan.retained_rank = 475  # vacuum basis columns: at most one per retain person (95% of 500)
    c.plan.image_size = 336
    c.plan.generate_batch = 16
    c.plan.prompt_length = 640  # 576 image tokens + question and options
    c.plan.max_new_tokens = 50
    c.plan.frozen_dtype = ""  # "": f32 master weights; "bfloat16": the frozen base in bf16 (only the LoRA trains)
    c.plan.device_memory_gb = 0.0  # 0: do not judge; or pass --device-memory
    return c
