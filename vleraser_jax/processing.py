"""Prompt templates, tokenisation, image preprocessing and batch collation (numpy out).

LLaVA-1.5 only for now (Qwen2-VL comes later). `LlavaProcessing.__call__` delegates to
transformers' `LlavaProcessor`, built explicitly from a tokenizer and the PIL-backend
`CLIPImageProcessorPil`, so the reference and this code cannot drift apart.
`collate_for_training` expands `<image>` at the id level instead, because it needs the
prompt/answer boundary; tests check it against `LlavaProcessor` on the joined text.

Nothing here imports torch. transformers itself imports torch whenever torch is installed
(`configuration_utils` -> `modeling_rope_utils`), so transformers is imported lazily: importing
this module stays torch-free, and the whole path runs in an environment without torch.
"""

from __future__ import annotations

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


# ----------------------------------------------------------------------------- images


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PREPROCESSOR_CONFIG
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


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


class LlavaProcessing:
    """LLaVA-1.5 text+image processing with numpy outputs (build with `load_processor`).

    One image becomes `num_image_tokens` copies of the image token: (image_size//patch_size)²,
    plus one (CLS) when `vision_feature_select_strategy == "full"`.
    """

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
        self.image_token_id = int(image_token_index)
        token = _added_token(tokenizer, self.image_token_id)
        if token is None:
            raise ValueError(
                f"image_token_index={self.image_token_id} is not an added (never split) token of the tokenizer "
                f"(id maps to {tokenizer.convert_ids_to_tokens(self.image_token_id)!r})"
            )
        self.image_token = token
        if tokenizer.pad_token is None:
            # Padding is masked by attention_mask/labels, never by id, so any token works;
            # unk keeps eos distinguishable in decoded text.
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        # CLIP prepends a CLS token: llava-hf ships num_additional_image_tokens=1 and "default"
        # drops it again, so the count matches the model's image features in both strategies.
        self.hf_processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=self.patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_token=token,
            num_additional_image_tokens=1,
        )

    # -- properties
    @property
    def num_image_tokens(self) -> int:
        n = (self.image_size // self.patch_size) ** 2
        return n + 1 if self.vision_feature_select_strategy == "full" else n

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

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

        Text is `prompt + " " + answer` (+ eos). Tokenisation: prompt ids are exactly
        `tokenizer(prompt)` (what generation sees), answer ids are the tail of
        `tokenizer(prompt + " " + answer)` after them; a tokenizer that merges across that
        boundary raises rather than train on a split never seen at inference.

        `labels` are aligned with `input_ids` (unshifted, as in transformers) and are -100 on
        padding, image tokens and, with `mask_prompt` (default), every prompt token, so the
        loss is on answer tokens and the eos only. `image` is one image or a list, matching the
        prompt's `<image>` count; `pixel_values` has one row per image in batch order, so mixed
        image/text-only batches work as in `__call__` (it is absent when no example has one).
        `max_length` truncates from the right; cutting an image token, or every answer token,
        raises. Padding goes to the longest row (rounded up to `pad_to_multiple_of`).
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
            fulls.append(f"{prompt} {answer}")
            images.extend(imgs)

        prompt_ids = tok(prompts, add_special_tokens=True)["input_ids"]
        full_ids = tok(fulls, add_special_tokens=True)["input_ids"]
        n_img = self.num_image_tokens
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
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_arr}
        if images:
            out["pixel_values"] = self.pixel_values(images)
        return out

    # -- decoding
    def decode(self, token_ids: Any) -> str:
        """Decode one sequence, skipping special tokens and negative ids (-100 labels)."""
        ids = np.asarray(token_ids).reshape(-1).tolist()
        return self.tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=True)

    def batch_decode(self, sequences: Any) -> list[str]:
        """Decode each row of a 2-D array or each sequence of a (ragged) list."""
        return [self.decode(s) for s in sequences]


# ----------------------------------------------------------------------------- loading


def load_processor(checkpoint_dir: str | os.PathLike) -> LlavaProcessing:
    """Build the processor of a local LLaVA checkpoint directory (no network, no remote code).

    Reads `config.json` (`model_type`, `image_token_index`, `vision_feature_select_strategy`,
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
    if model_type != "llava":
        raise ValueError(f"{cfg_path}: model_type={model_type!r}; load_processor supports 'llava'")
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
