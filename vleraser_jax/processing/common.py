"""What every model family's processing shares: constants, the image-input names, the training collator
(`_Processing`), token checks. Nothing here imports torch; transformers is imported lazily."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
# OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, as in transformers.image_utils.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MODEL_CONFIG = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

# Qwen2-VL's special tokens (a tiny test/synthetic tokenizer needs them as added tokens).
QWEN2_VL_IMAGE_TOKEN = "<|image_pad|>"
QWEN2_VL_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    QWEN2_VL_IMAGE_TOKEN,
    "<|video_pad|>",
)
# Qwen2-VL-7B-Instruct's chat template (images as <|vision_start|><|image_pad|><|vision_end|>).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


IMAGE_INPUTS = ("pixel_values", "image_grid_thw")


def image_inputs_of(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The image inputs present in a batch, to pass on as model keyword arguments."""
    return {k: batch[k] for k in IMAGE_INPUTS if k in batch}


# ----------------------------------------------------------------------------- prompts


def build_llava_prompt(question: str, with_image: bool = True) -> str:
    """MLLMU-Bench eval.py LLaVA prompt: `USER: <image>\\n{q}\\nASSISTANT:`.

    Text-only (Textual-QA) drops `<image>\\n`, as eval.py's generation task does
    (`USER: {q}\\nASSISTANT:`). Task instructions belong in `question`.
    """
    if with_image:
        return f"USER: {IMAGE_TOKEN}\n{question}\nASSISTANT:"
    return f"USER: {question}\nASSISTANT:"


# ----------------------------------------------------------------------------- processor


def _check_images(images: Any, where: str) -> list:
    """Flat list of PIL images / HWC arrays; strings are refused so nothing is ever fetched."""
    from PIL import Image as PILImage

    if images is None:
        return []
    if isinstance(images, (PILImage.Image, np.ndarray)):
        images = [images]
    out = list(images)
    for i, im in enumerate(out):
        if not isinstance(im, (PILImage.Image, np.ndarray)):
            raise TypeError(f"{where}: image {i} is {type(im).__name__}; expected a PIL.Image or numpy array")
    return out


class _Processing(abc.ABC):
    """What every model's processing shares: token ids, the training collator, decoding.

    Subclasses set `tokenizer`, `image_token`, `image_token_id`, `answer_separator` (joined between
    prompt and answer) and implement `_image_inputs`.
    """

    tokenizer: Any
    image_token: str
    image_token_id: int
    answer_separator: str = " "

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @abc.abstractmethod
    def _image_inputs(self, images: list) -> tuple[dict[str, np.ndarray], list[int]]:
        """(model image inputs, image tokens per image) for a non-empty flat list of images."""

    # -- training batches
    def collate_for_training(
        self,
        examples: Sequence[Mapping[str, Any]],
        padding_side: str = "right",
        max_length: int | None = None,
        *,
        pad_to_multiple_of: int | None = None,
        mask_prompt: bool = True,
        append_eos: bool = True,
    ) -> dict[str, np.ndarray]:
        """Batch `{"prompt", "answer", "image"?}` examples for next-token training.

        Text is `prompt + answer_separator + answer` (+ eos; the separator is " " for LLaVA's
        `...ASSISTANT:` prompts and "" for chat-template prompts that end in a newline).
        Tokenisation: prompt ids are exactly `tokenizer(prompt)` (what generation sees), answer
        ids are the tail of `tokenizer(text)` after them; a tokenizer that merges across that
        boundary raises rather than train on a split never seen at inference.

        `labels` are aligned with `input_ids` (unshifted, as in transformers) and are -100 on
        padding, image tokens and, with `mask_prompt` (default), every prompt token, so the
        loss is on answer tokens and the eos only. `image` is one image or a list, matching the
        prompt's image-token count; the image inputs (`pixel_values`, and `image_grid_thw` for
        Qwen2-VL) cover every image in batch order, so mixed image/text-only batches work as in
        `__call__` (they are absent when no example has an image). `max_length` truncates from
        the right; cutting an image token, or every answer token, raises. Padding goes to the
        longest row (rounded up to `pad_to_multiple_of`).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
        if not examples:
            raise ValueError("collate_for_training: empty batch")
        prompts, fulls, images = self._joined_texts(examples)
        image_inputs, tokens_per_image = self._image_inputs(images) if images else ({}, [])
        counts = iter(tokens_per_image)
        prompt_ids = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        full_ids = self.tokenizer(fulls, add_special_tokens=True)["input_ids"]
        rows = [self._training_row(i, p, f, prompts[i], counts, max_length, mask_prompt, append_eos)
                for i, (p, f) in enumerate(zip(prompt_ids, full_ids))]
        length = max(len(r[0]) for r in rows)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        b = len(rows)
        input_ids = np.full((b, length), self.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((b, length), dtype=np.int32)
        label_arr = np.full((b, length), IGNORE_INDEX, dtype=np.int32)
        for r, (ids, labels) in enumerate(rows):
            n = len(ids)
            sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
            input_ids[r, sl] = ids
            attention_mask[r, sl] = 1
            label_arr[r, sl] = labels
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_arr, **image_inputs}

    def _joined_texts(self, examples) -> tuple[list[str], list[str], list]:
        """(prompts, prompt + separator + answer texts, every image in order), each example checked."""
        prompts, fulls, images = [], [], []
        for i, ex in enumerate(examples):
            try:
                prompt, answer = ex["prompt"], ex["answer"]
            except KeyError as e:
                raise KeyError(f"example {i}: missing field {e.args[0]!r}") from None
            if self.image_token in answer:
                raise ValueError(f"example {i}: answer contains {self.image_token!r}")
            imgs = _check_images(ex.get("image"), f"example {i}")
            n_tags = prompt.count(self.image_token)
            if n_tags != len(imgs):
                raise ValueError(
                    f"example {i}: prompt has {n_tags} {self.image_token!r} tag(s) but {len(imgs)} image(s) were given"
                )
            prompts.append(prompt)
            fulls.append(f"{prompt}{self.answer_separator}{answer}")
            images.extend(imgs)
        return prompts, fulls, images

    def _training_row(self, i: int, p: list[int], f: list[int], prompt: str, counts, max_length: int | None,
                      mask_prompt: bool, append_eos: bool) -> tuple[list[int], list[int]]:
        """(ids, labels) of example i: image tokens expanded (`counts` yields each image's token count)."""
        if f[: len(p)] != p:
            raise ValueError(f"example {i}: tokenizer merges across the prompt/answer boundary; "
                             f"prompt ends {prompt[-20:]!r}")
        answer = list(f[len(p) :])
        if append_eos:
            answer.append(self.eos_token_id)
        ids: list[int] = []
        labels: list[int] = []
        for t in p:
            if t == self.image_token_id:
                n_img = next(counts)
                ids.extend([t] * n_img)
                labels.extend([IGNORE_INDEX] * n_img)
            else:
                ids.append(t)
                labels.append(IGNORE_INDEX if mask_prompt else t)
        n_prompt = len(ids)
        ids.extend(answer)
        labels.extend(answer)
        if max_length is not None and len(ids) > max_length:
            img_pos = [j for j, t in enumerate(ids) if t == self.image_token_id]
            if img_pos and img_pos[-1] >= max_length:
                raise ValueError(
                    f"example {i}: max_length={max_length} would cut image tokens "
                    f"(they end at position {img_pos[-1] + 1}; the sequence has {len(ids)} tokens)"
                )
            if n_prompt >= max_length:
                raise ValueError(f"example {i}: max_length={max_length} leaves no answer tokens (prompt has {n_prompt})")
            ids, labels = ids[:max_length], labels[:max_length]
        return ids, labels

    # -- decoding
    def decode(self, token_ids: Any) -> str:
        """Decode one sequence, skipping special tokens and negative ids (-100 labels)."""
        ids = np.asarray(token_ids).reshape(-1).tolist()
        return self.tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=True)

    def batch_decode(self, sequences: Any) -> list[str]:
        """Decode each row of a 2-D array or each sequence of a (ragged) list."""
        return [self.decode(s) for s in sequences]


def _ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        # Padding is masked by attention_mask/labels, never by id, so any token works;
        # unk keeps eos distinguishable in decoded text.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


def _image_token(tokenizer: Any, token_id: int, field: str) -> tuple[int, str]:
    """(id, token string) of the image placeholder, which must be a never-split added token."""
    token = _added_token(tokenizer, int(token_id))
    if token is None:
        raise ValueError(
            f"{field}={int(token_id)} is not an added (never split) token of the tokenizer "
            f"(id maps to {tokenizer.convert_ids_to_tokens(int(token_id))!r})"
        )
    return int(token_id), token


def _added_token(tokenizer: Any, token_id: int) -> str | None:
    """The token string if `token_id` is an added token that encodes to itself alone, else None.

    Added tokens are matched before pre-tokenisation, so `<image>` never merges with its
    neighbours; that is what lets collate_for_training expand it at the id level.
    """
    added = tokenizer.added_tokens_decoder.get(int(token_id))
    if added is None:
        return None
    token = str(added)
    if tokenizer.encode(token, add_special_tokens=False) != [int(token_id)]:
        return None
    return token
