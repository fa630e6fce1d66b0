"""Prompt templates, tokenisation, image preprocessing and batch collation (numpy out).

- `common`: constants, image inputs, the shared training collator; `families`: `LlavaProcessing`,
  `Qwen2VLProcessing`; `loading`: `load_processor` and the `preprocessor_config.json` writers.

`load_processor(dir)` builds `LlavaProcessing` or `Qwen2VLProcessing` from config.json's model_type.

LLaVA-1.5: `LlavaProcessing.__call__` delegates to transformers' `LlavaProcessor`, built
explicitly from a tokenizer and the PIL-backend `CLIPImageProcessorPil`, so the reference and
this code cannot drift apart. Qwen2-VL: transformers' `Qwen2VLProcessor` cannot be built without
torch (its video-processor slot imports it), so `Qwen2VLProcessing` uses the torch-free
`Qwen2VLImageProcessorPil` and expands `<|image_pad|>` itself; tests check it against
`Qwen2VLProcessor`. Both `collate_for_training`s expand image tokens at the id level, because
they need the prompt/answer boundary; tests check them against the reference on the joined text.

Nothing here imports torch. transformers itself imports torch whenever torch is installed
(`configuration_utils` -> `modeling_rope_utils`), so transformers is imported lazily: importing
this module stays torch-free, and the whole path runs in an environment without torch.
"""

from .common import (CHAT_TEMPLATE_FILES, CLIP_MEAN, CLIP_STD, IGNORE_INDEX, IMAGE_INPUTS, IMAGE_TOKEN, MODEL_CONFIG,
                     PREPROCESSOR_CONFIG, QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_IMAGE_TOKEN, QWEN2_VL_SPECIAL_TOKENS,
                     build_llava_prompt, image_inputs_of)
from .families import LlavaProcessing, Qwen2VLProcessing
from .loading import load_processor, write_image_processor_config, write_qwen2_vl_image_processor_config

__all__ = [
    "CHAT_TEMPLATE_FILES", "CLIP_MEAN", "CLIP_STD", "IGNORE_INDEX", "IMAGE_INPUTS", "IMAGE_TOKEN", "MODEL_CONFIG",
    "PREPROCESSOR_CONFIG", "QWEN2_VL_CHAT_TEMPLATE", "QWEN2_VL_IMAGE_TOKEN", "QWEN2_VL_SPECIAL_TOKENS",
    "LlavaProcessing", "Qwen2VLProcessing", "build_llava_prompt", "image_inputs_of", "load_processor",
    "write_image_processor_config", "write_qwen2_vl_image_processor_config",
]
