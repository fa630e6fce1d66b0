"""tiny_qwen2vl: the real Qwen2-VL architecture at toy width, trained from scratch on the synthetic benchmark.

The recipe is tiny_llava's (configs/tiny_llava.py: data, stage schedules, selection grids); the unlearning
settings are this backbone's own selection (results/tiny_qwen2vl-forget15/selection/). The model differs:
a Qwen2-VL ViT (Conv3d patches of 4 px, 2-D rotary, 2x2 patch merger: a 32 px portrait
becomes 16 image tokens, as tiny_llava's 8 px CLIP patches do) feeding a Qwen2 decoder of tiny_llava's
sizes (q/k/v biases, M-RoPE), with Qwen2-VL's chat template. Prompts are longer than LLaVA's (the
template's system turn): at most 89 tokens in the training data vs LLaVA's 75, within the same max_length.

Use: `vleraser train --config configs/tiny_qwen2vl.py --stage base|oracle|vanilla`, `vleraser demo --backbone tiny_qwen2vl`.
"""

from pathlib import Path

from vleraser_jax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("tiny_llava.py"))
    c.name = "tiny_qwen2vl"
    c.family = "qwen2_vl"

    m = c.model
    del m.vision_feature_layer  # Qwen2-VL merges the tower's last layer
    m.patch_size = 4
    m.merge_size = 2
    m.mrope_section = (4, 6, 6)  # (temporal, height, width) rotary pairs; sums to head_dim/2 = 16, as 7B's 16/24/24 of 64
    m.rope_theta = 10000.0

    # The merger is Qwen2-VL's projector: it gets the projector's fast rate (first matching rule wins).
    for stage in (c.base, c.oracle, c.vanilla):
        stage.lr_multipliers = (("^vision/merger/", 3.0), ("^vision/", 0.1))
    c.base.steps = 3000  # tiny_llava's shorter base was checked on tiny_llava only; this backbone's results are at 3000

    # Each method's choice of `vleraser sweep` on this backbone (12 settings per method, 10 validation people,
    # retain and real within 5 points of Vanilla; results/tiny_qwen2vl-forget15/selection/<method>.json).
    c.vl_eraser.deletion_strength = 0.5  # 4 of 12 eligible; the same choice as tiny_llava's (α 0.5, 90% energy,
    c.vl_eraser.threshold = 0.9  # image+text vacuum)
    c.vl_eraser.vacuum_source = "image+text"
    c.vl_eraser_paper.deletion_strength = 4.0  # 7 of 12 eligible
    c.vl_eraser_paper.learning_rate = 3e-3
    # chosen epochs 2, 2, 1, 2 (eligible of 12: 7, 8, 12, 7), run at their validation optimizer steps
    for name, lr, steps in (("ga", 3e-4, 76), ("gd", 1e-3, 76), ("kl", 3e-4, 38), ("npo", 3e-4, 76)):
        c.baselines[name].learning_rate = lr
        c.baselines[name].steps = steps
    c.baselines.mmunlearner.learning_rate = 1e-4  # 1 of 12 eligible; 1 epoch (tiny_llava's), as selected
    return c
