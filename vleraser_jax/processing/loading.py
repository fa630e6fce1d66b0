"""Building a processor from a local checkpoint directory (no network, no remote code), and writing the
image processors' `preprocessor_config.json`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import (CHAT_TEMPLATE_FILES, CLIP_MEAN, CLIP_STD, MODEL_CONFIG, PREPROCESSOR_CONFIG, _PIL_RESAMPLE,
                     _TOKENIZER_FILES, _added_token)
from .families import LlavaProcessing, Qwen2VLProcessing


# ----------------------------------------------------------------------------- images


def _write_preprocessor_config(out_dir: str | os.PathLike, cfg: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PREPROCESSOR_CONFIG
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def _pixel_normalisation(resample: str, image_mean: Sequence[float], image_std: Sequence[float]) -> dict:
    """The entries both image processors share: resampling, 1/255 rescale, mean/std normalisation, RGB."""
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"resample={resample!r}; expected one of {sorted(_PIL_RESAMPLE)}")
    return {"resample": _PIL_RESAMPLE[resample], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [float(x) for x in image_mean], "image_std": [float(x) for x in image_std],
            "do_convert_rgb": True}


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
    cfg = {
        # The canonical class name: AutoImageProcessor maps it to either backend, and the PIL
        # backend's from_pretrained accepts it.
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(shortest_edge or image_size)},
        "do_center_crop": True,
        "crop_size": {"height": int(image_size), "width": int(image_size)},
        **_pixel_normalisation(resample, image_mean, image_std),
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
    normalisation = _pixel_normalisation(resample, image_mean, image_std)
    factor = patch_size * merge_size
    if min_pixels < factor * factor or max_pixels < min_pixels:
        raise ValueError(
            f"need (patch_size·merge_size)² = {factor * factor} <= min_pixels={min_pixels} <= max_pixels={max_pixels}"
        )
    cfg = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        **normalisation,
        "patch_size": int(patch_size),
        "temporal_patch_size": int(temporal_patch_size),
        "merge_size": int(merge_size),
    }
    return _write_preprocessor_config(out_dir, cfg)


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

    from ..models.configs import ConfigError, Qwen2VLConfig

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
