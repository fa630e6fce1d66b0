"""Prompt templates, tokenisation, image preprocessing and batch collation (numpy out).

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

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 2048,
    extra_special_tokens: Sequence[str] = (IMAGE_TOKEN,),
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer, Llama-style specials, saved to `out_dir`.

    Ids: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, then `extra_special_tokens` in order (so
    `<image>` is 4 by default). A BOS is prepended to every encoding (no EOS), like Llama.
    Training is deterministic for a given text order. `AutoTokenizer.from_pretrained(out_dir)`
    reloads an identical tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_special_tokens]
    if len(set(specials)) != len(specials):
        raise ValueError(f"extra_special_tokens {list(extra_special_tokens)} repeat a base special token")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # No prefix space: the prompt/answer split in collate_for_training relies on " answer"
    # starting a fresh pre-token, which GPT-2's regex guarantees after non-space text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        # The full byte alphabet keeps every string encodable (no <unk> at run time).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)

    kwargs: dict[str, Any] = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=list(extra_special_tokens),
        # transformers rebuilds the TemplateProcessing post-processor from these flags on every
        # load, so they, not a hand-made post-processor, are what survives a save/reload.
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return tok


def train_qwen2_vl_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 2048,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """`train_tokenizer` with Qwen2-VL's special tokens, its chat template and `<|im_end|>` as eos.

    Ids: the four Llama-style specials 0..3, then `QWEN2_VL_SPECIAL_TOKENS` in order (so
    `<|image_pad|>` is 8). Saved to `out_dir`; `AutoTokenizer.from_pretrained` reloads it whole.
    """
    tok = train_tokenizer(
        texts,
        out_dir,
        vocab_size,
        QWEN2_VL_SPECIAL_TOKENS,
        min_frequency=min_frequency,
        model_max_length=model_max_length,
    )
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tok.eos_token = "<|im_end|>"  # the chat turn terminator is what generation must stop on
    tok.save_pretrained(str(out_dir))
    return tok


# ----------------------------------------------------------------------------- images


def _write_preprocessor_config(out_dir: str | os.PathLike, cfg: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PREPROCESSOR_CONFIG
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def write_image_processor_config(
    out_dir: str | os.PathLike,
    image_size: int,
    *,
    shortest_edge: int | None = None,
    resample: str = "bicubic",
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
) -> Path:
    """Write a CLIP-style `preprocessor_config.json` producing `image_size`² crops.

    Resize the shortest edge to `shortest_edge` (default `image_size`), center-crop, rescale by
    1/255, normalise. Loadable by `CLIPImageProcessorPil.from_pretrained(out_dir)`. Returns the path.
    """
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"resample={resample!r}; expected one of {sorted(_PIL_RESAMPLE)}")
    cfg = {
        # The canonical class name: AutoImageProcessor maps it to either backend, and the PIL
        # backend's from_pretrained accepts it.
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(shortest_edge or image_size)},
        "resample": _PIL_RESAMPLE[resample],
        "do_center_crop": True,
        "crop_size": {"height": int(image_size), "width": int(image_size)},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in image_mean],
        "image_std": [float(x) for x in image_std],
        "do_convert_rgb": True,
    }
    return _write_preprocessor_config(out_dir, cfg)


def write_qwen2_vl_image_processor_config(
    out_dir: str | os.PathLike,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    resample: str = "bicubic",
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
) -> Path:
    """Write a Qwen2-VL `preprocessor_config.json`: resize to a multiple of patch_size·merge_size
    with min_pixels <= h·w <= max_pixels (aspect ratio kept), rescale, normalise, cut into patches.

    Loadable by `Qwen2VLImageProcessorPil.from_pretrained(out_dir)`. Returns the path.
    """
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"resample={resample!r}; expected one of {sorted(_PIL_RESAMPLE)}")
    factor = patch_size * merge_size
    if min_pixels < factor * factor or max_pixels < min_pixels:
        raise ValueError(
            f"need (patch_size·merge_size)² = {factor * factor} <= min_pixels={min_pixels} <= max_pixels={max_pixels}"
        )
    cfg = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        "resample": _PIL_RESAMPLE[resample],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in image_mean],
        "image_std": [float(x) for x in image_std],
        "do_convert_rgb": True,
        "patch_size": int(patch_size),
        "temporal_patch_size": int(temporal_patch_size),
        "merge_size": int(merge_size),
    }
    return _write_preprocessor_config(out_dir, cfg)


# The model inputs that carry images (LLaVA: pixel_values; Qwen2-VL: pixel_values + image_grid_thw).
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
        tok = self.tokenizer
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

        image_inputs, tokens_per_image = self._image_inputs(images) if images else ({}, [])
        counts = iter(tokens_per_image)
        prompt_ids = tok(prompts, add_special_tokens=True)["input_ids"]
        full_ids = tok(fulls, add_special_tokens=True)["input_ids"]
        rows: list[tuple[list[int], list[int]]] = []
        for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
            if f[: len(p)] != p:
                raise ValueError(
                    f"example {i}: tokenizer merges across the prompt/answer boundary; "
                    f"prompt ends {prompts[i][-20:]!r}"
                )
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
                    raise ValueError(
                        f"example {i}: max_length={max_length} leaves no answer tokens (prompt has {n_prompt})"
                    )
                ids, labels = ids[:max_length], labels[:max_length]
            rows.append((ids, labels))

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

    # -- decoding
    def decode(self, token_ids: Any) -> str:
        """Decode one sequence, skipping special tokens and negative ids (-100 labels)."""
        ids = np.asarray(token_ids).reshape(-1).tolist()
        return self.tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=True)

    def batch_decode(self, sequences: Any) -> list[str]:
        """Decode each row of a 2-D array or each sequence of a (ragged) list."""
        return [self.decode(s) for s in sequences]


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


def _ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        # Padding is masked by attention_mask/labels, never by id, so any token works;
        # unk keeps eos distinguishable in decoded text.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


# ----------------------------------------------------------------------------- loading


def load_processor(checkpoint_dir: str | os.PathLike) -> LlavaProcessing | Qwen2VLProcessing:
    """Build the processor of a local checkpoint directory (no network, no remote code).

    Dispatches on config.json's `model_type`: "llava" -> `LlavaProcessing`, "qwen2_vl" ->
    `Qwen2VLProcessing` (see `_load_qwen2_vl_processor`).

    LLaVA reads `config.json` (`model_type`, `image_token_index`, `vision_feature_select_strategy`,
    `vision_config.image_size` / `.patch_size`; omitted fields take LlavaConfig's defaults), the
    tokenizer files and `preprocessor_config.json` (loaded with `CLIPImageProcessorPil`).
    A `processor_config.json` there, if any, is not read: config.json is the source of truth.
    """
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaConfig

    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    cfg_path = root / MODEL_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{root}: missing {MODEL_CONFIG}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    model_type = raw.get("model_type")
    if model_type == "qwen2_vl":
        return _load_qwen2_vl_processor(root, raw)
    if model_type != "llava":
        raise ValueError(f"{cfg_path}: model_type={model_type!r}; load_processor supports 'llava' and 'qwen2_vl'")
    try:
        cfg = LlavaConfig.from_pretrained(str(root), local_files_only=True)
    except Exception as e:  # strict-dataclass validation names the field; add the file
        raise ValueError(f"{cfg_path}: invalid LLaVA config: {e}") from e
    vcfg = cfg.vision_config
    for field in ("image_size", "patch_size"):
        if not isinstance(getattr(vcfg, field, None), int):
            raise ValueError(f"{cfg_path}: vision_config.{field} must be an int, got {getattr(vcfg, field, None)!r}")
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(
            f"{cfg_path}: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}; "
            "expected 'default' or 'full'"
        )
    if vcfg.image_size % vcfg.patch_size:
        raise ValueError(
            f"{cfg_path}: vision_config.image_size={vcfg.image_size} is not a multiple of "
            f"vision_config.patch_size={vcfg.patch_size}"
        )

    if not any((root / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{root}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)

    pp_path = root / PREPROCESSOR_CONFIG
    if not pp_path.is_file():
        raise FileNotFoundError(f"{root}: missing {PREPROCESSOR_CONFIG} (write one with write_image_processor_config)")
    image_processor = CLIPImageProcessorPil.from_pretrained(str(root), local_files_only=True)
    out_hw = _output_size(image_processor, pp_path)
    if out_hw != (vcfg.image_size, vcfg.image_size):
        raise ValueError(
            f"{pp_path}: images come out {out_hw[0]}x{out_hw[1]} but {cfg_path} "
            f"vision_config.image_size={vcfg.image_size}"
        )

    image_token_index = cfg.image_token_index
    if _added_token(tokenizer, image_token_index) is None:
        raise ValueError(
            f"{cfg_path}: image_token_index={image_token_index} is not an added (never split) token of the "
            f"tokenizer in {root} (id maps to {tokenizer.convert_ids_to_tokens(image_token_index)!r})"
        )
    return LlavaProcessing(
        tokenizer,
        image_processor,
        image_token_index=image_token_index,
        image_size=vcfg.image_size,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )


def _load_qwen2_vl_processor(root: Path, raw: dict) -> Qwen2VLProcessing:
    """Qwen2-VL: config.json (parsed as the model loader does), the tokenizer files, its chat template
    (from the tokenizer, else `chat_template.jinja` / `chat_template.json`) and `preprocessor_config.json`
    (loaded with `Qwen2VLImageProcessorPil`; its patch/merge/temporal sizes must match the vision config).
    """
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from .models.configs import ConfigError, Qwen2VLConfig

    cfg_path = root / MODEL_CONFIG
    try:
        cfg = Qwen2VLConfig.from_hf_config(raw)
    except ConfigError as e:
        raise ValueError(f"{cfg_path}: invalid Qwen2-VL config: {e}") from e
    if not any((root / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{root}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    chat_template = tokenizer.chat_template or _read_chat_template(root)
    if not chat_template:
        raise ValueError(f"{root}: no chat template (not in the tokenizer, nor in {' / '.join(CHAT_TEMPLATE_FILES)})")

    pp_path = root / PREPROCESSOR_CONFIG
    if not pp_path.is_file():
        raise FileNotFoundError(
            f"{root}: missing {PREPROCESSOR_CONFIG} (write one with write_qwen2_vl_image_processor_config)"
        )
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(root), local_files_only=True)
    vision = cfg.vision
    for name, want in (
        ("patch_size", vision.patch_size),
        ("merge_size", vision.spatial_merge_size),
        ("temporal_patch_size", vision.temporal_patch_size),
    ):
        got = getattr(image_processor, name, None)
        if got != want:
            raise ValueError(f"{pp_path}: {name}={got!r} but {cfg_path} vision_config implies {want}")
    if _added_token(tokenizer, cfg.image_token_id) is None:
        raise ValueError(
            f"{cfg_path}: image_token_id={cfg.image_token_id} is not an added (never split) token of the "
            f"tokenizer in {root} (id maps to {tokenizer.convert_ids_to_tokens(cfg.image_token_id)!r})"
        )
    return Qwen2VLProcessing(tokenizer, image_processor, image_token_id=cfg.image_token_id, chat_template=chat_template)


def _read_chat_template(root: Path) -> str | None:
    jinja, js = (root / f for f in CHAT_TEMPLATE_FILES)
    if jinja.is_file():
        return jinja.read_text()
    if js.is_file():
        try:
            return json.loads(js.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{js}: not a chat template file ({e})") from e
    return None


def _output_size(image_processor: Any, pp_path: Path) -> tuple[int, int]:
    """(height, width) every image is mapped to; LLaVA needs it fixed."""
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size or {}
        if "height" in crop and "width" in crop:
            return int(crop["height"]), int(crop["width"])
        raise ValueError(f"{pp_path}: do_center_crop is set but crop_size={crop!r} lacks height/width")
    size = getattr(image_processor, "size", None) or {}
    if getattr(image_processor, "do_resize", False) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"{pp_path}: neither crop_size nor size gives a fixed height/width")


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
