"""Unlearning: the shared trainer, VL-Eraser (LoRA, vacuum projector, distillation, deletion), baselines."""
