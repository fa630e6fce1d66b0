"""The two model families' processors: LLaVA-1.5 (transformers' `LlavaProcessor` over the PIL image
processor) and Qwen2-VL (torch-free `Qwen2VLImageProcessorPil` + its own `<|image_pad|>` expansion)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .common import _check_images, _ensure_pad_token, _image_token, _Processing, build_llava_prompt

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image
    from transformers import PreTrainedTokenizerBase


class LlavaProcessing(_Processing):
    """LLaVA-1.5 text+image processing with numpy outputs (build with `load_processor`).

    One image becomes `num_image_tokens` copies of the image token: (image_size//patch_size)²,
    plus one (CLS) when `vision_feature_select_strategy == "full"`.
    """

    family = "llava"
    answer_separator = " "

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        *,
        image_token_index: int,
        image_size: int,
        patch_size: int,
        vision_feature_select_strategy: str = "default",
    ):
        from transformers import LlavaProcessor

        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={vision_feature_select_strategy!r}; expected 'default' or 'full'"
            )
        if patch_size <= 0 or image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a positive multiple of patch_size={patch_size}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token_id, self.image_token = _image_token(tokenizer, image_token_index, "image_token_index")
        _ensure_pad_token(tokenizer)
        # CLIP prepends a CLS token: llava-hf ships num_additional_image_tokens=1 and "default"
        # drops it again, so the count matches the model's image features in both strategies.
        self.hf_processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=self.patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_token=self.image_token,
            num_additional_image_tokens=1,
        )

    # -- properties
    @property
    def num_image_tokens(self) -> int:
        n = (self.image_size // self.patch_size) ** 2
        return n + 1 if self.vision_feature_select_strategy == "full" else n

    def build_prompt(self, question: str, with_image: bool = True) -> str:
        """See `build_llava_prompt`."""
        return build_llava_prompt(question, with_image)

    # -- inference batches
    def __call__(
        self,
        texts: str | Sequence[str],
        images: Sequence[Image.Image] | None = None,
        padding_side: str = "left",
    ) -> dict[str, np.ndarray]:
        """Tokenise `texts` (padded to the longest), expanding each `<image>`.

        `images` is a flat list, one per `<image>` in batch order (transformers' convention), so a
        batch may mix image and text-only prompts. Returns int32 `input_ids`/`attention_mask`
        and, with images, float32 NCHW `pixel_values` of shape (num_images, 3, S, S).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
        texts = [texts] if isinstance(texts, str) else list(texts)
        imgs = _check_images(images, "LlavaProcessing.__call__")
        enc = self.hf_processor(
            text=texts,
            images=imgs or None,
            padding="longest",
            padding_side=padding_side,
            return_tensors="np",
        )
        out = {
            "input_ids": np.asarray(enc["input_ids"], dtype=np.int32),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int32),
        }
        if imgs:
            out["pixel_values"] = np.asarray(enc["pixel_values"], dtype=np.float32)
        return out

    def pixel_values(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Preprocess images alone: float32 (N, 3, S, S)."""
        imgs = _check_images(images, "LlavaProcessing.pixel_values")
        pv = self.image_processor(imgs, return_tensors="np")["pixel_values"]
        return np.asarray(pv, dtype=np.float32)

    def _image_inputs(self, images: list) -> tuple[dict[str, np.ndarray], list[int]]:
        return {"pixel_values": self.pixel_values(images)}, [self.num_image_tokens] * len(images)


class Qwen2VLProcessing(_Processing):
    """Qwen2-VL text+image processing with numpy outputs (build with `load_processor`).

    An image of h x w pixels is resized to a multiple of patch_size·merge_size (within the image
    processor's pixel budget) and becomes (h/patch)·(w/patch)/merge² copies of `<|image_pad|>`;
    `pixel_values` holds every image's flattened patches, `image_grid_thw` each image's
    (1, h/patch, w/patch). Prompts come from the tokenizer's chat template.
    """

    family = "qwen2_vl"
    answer_separator = ""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        *,
        image_token_id: int,
        chat_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = int(image_processor.merge_size)
        self.image_token_id, self.image_token = _image_token(tokenizer, image_token_id, "image_token_id")
        self.chat_template = chat_template or tokenizer.chat_template
        if not self.chat_template:
            raise ValueError("Qwen2-VL prompts need a chat template; the tokenizer has none and none was given")
        _ensure_pad_token(tokenizer)

    def build_prompt(self, question: str, with_image: bool = True) -> str:
        """One user turn through the chat template, ending with the assistant header.

        With an image, the turn's content is [image, text] (as MLLMU-Bench's Qwen2-VL evaluation
        builds it), rendered as `<|vision_start|><|image_pad|><|vision_end|>question`.
        """
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )

    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """Preprocess images alone: float32 `pixel_values` [patches, C·t·p·p], int32 `image_grid_thw` [N, 3]."""
        return self._image_inputs(_check_images(images, "Qwen2VLProcessing.image_inputs"))[0]

    def num_image_tokens(self, image_grid_thw: np.ndarray) -> list[int]:
        """Image tokens per image: t·h·w / merge_size²."""
        return [int(n) for n in np.prod(np.asarray(image_grid_thw), axis=-1) // self.merge_size**2]

    def _image_inputs(self, images: list) -> tuple[dict[str, np.ndarray], list[int]]:
        enc = self.image_processor(images, return_tensors="np")
        grid = np.asarray(enc["image_grid_thw"], dtype=np.int32)
        out = {"pixel_values": np.asarray(enc["pixel_values"], dtype=np.float32), "image_grid_thw": grid}
        return out, self.num_image_tokens(grid)

    # -- inference batches
    def __call__(
        self,
        texts: str | Sequence[str],
        images: Sequence[Image.Image] | None = None,
        padding_side: str = "left",
    ) -> dict[str, np.ndarray]:
        """Tokenise `texts` (padded to the longest), expanding the k-th `<|image_pad|>` of the batch
        into the k-th image's token count.

        `images` is a flat list, one per image token in batch order, so a batch may mix image and
        text-only prompts. Returns int32 `input_ids`/`attention_mask` and, with images, float32
        `pixel_values` [patches, C·t·p·p] and int32 `image_grid_thw` [num_images, 3].
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
        texts = [texts] if isinstance(texts, str) else list(texts)
        imgs = _check_images(images, "Qwen2VLProcessing.__call__")
        n_tags = sum(t.count(self.image_token) for t in texts)
        if n_tags != len(imgs):
            raise ValueError(
                f"texts hold {n_tags} {self.image_token!r} image token(s) but {len(imgs)} image(s) were given"
            )
        image_inputs, counts = self._image_inputs(imgs) if imgs else ({}, [])
        counts_iter = iter(counts)
        expanded = []
        for text in texts:
            parts = text.split(self.image_token)
            pieces = [parts[0]]
            for part in parts[1:]:
                pieces.append(self.image_token * next(counts_iter) + part)
            expanded.append("".join(pieces))
        enc = self.tokenizer(expanded, padding="longest", padding_side=padding_side, return_tensors="np")
        return {
            "input_ids": np.asarray(enc["input_ids"], dtype=np.int32),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int32),
            **image_inputs,
        }
