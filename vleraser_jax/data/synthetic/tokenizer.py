"""Tokenizers for models trained from scratch: a byte-level BPE (Llama-style specials, or Qwen2-VL's
specials and chat template) trained on the synthetic benchmark's own text."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import mllmu
from ..mllmu import (CLOZE_INSTRUCTION, FT_DATA, FULL_SET, GEN_INSTRUCTION_TEXTUAL, GEN_INSTRUCTION_VISUAL,
                     MC_INSTRUCTION, OPTION_LETTERS, RETAIN_SET, TEST_SET)
from ...processing import (IMAGE_TOKEN, QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_IMAGE_TOKEN, QWEN2_VL_SPECIAL_TOKENS,
                           write_image_processor_config, write_qwen2_vl_image_processor_config)
from ..splits import HOLDOUT_SET, has_holdout
from .tasks import _format_cloze, _format_mc
from .writer import load_base_set, read_info

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast


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


# ----------------------------------------------------------------------------- tokenizer

# eval.py's prompt scaffolding, so its fixed strings get merges of their own.
PROMPT_TEMPLATES = (
    "USER:", "ASSISTANT:", "USER: ", "\nASSISTANT:", "Question:", "Correct Answer:", "Answer:",
    MC_INSTRUCTION, GEN_INSTRUCTION_VISUAL, GEN_INSTRUCTION_TEXTUAL, CLOZE_INSTRUCTION, "[Blank]",
)


FAMILIES = ("llava", "qwen2_vl")


def _chat(q: str, a: str, visual: bool, family: str = "llava") -> str:
    """A prompt + answer as the family's model sees it, without its special/image tokens (added tokens
    are never merged): LLaVA's `build_llava_prompt`, Qwen2-VL's chat template."""
    if family == "qwen2_vl":
        return f"system\nYou are a helpful assistant.\nuser\n{q}\nassistant\n{a}"
    sep = "\n" if visual else ""
    return f"USER: {sep}{q}\nASSISTANT: {a}"


def corpus_texts(root: str | os.PathLike, family: str = "llava") -> Iterator[str]:
    """Every text of a synthetic benchmark as the `family`'s models see it (prompts with answers), in a
    fixed order. The holdout people's text is in it too: their names must tokenize like everyone else's, or a
    membership attack would tell them apart by their token statistics alone."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    _chat_ = functools.partial(_chat, family=family)
    yield from PROMPT_TEMPLATES * 4  # repeated so min_frequency does not drop their merges
    holdout = (HOLDOUT_SET,) if has_holdout(root) else ()
    for config in (FULL_SET, TEST_SET, RETAIN_SET, *holdout):
        for p in mllmu.load_profiles(root, config, verify_images=False):
            yield from (f"{k}: {v}" for k, v in p.biography.items())
            for visual, items in ((True, p.visual_mc), (False, p.textual_mc)):
                for mc in items:
                    yield _chat_(_format_mc({"Question": mc.question, "Options": mc.options}), mc.answer, visual)
                    # eval.py's few-shot block format
                    opts = "\n".join(f"{k}: {mc.options[k]}" for k in OPTION_LETTERS)
                    yield f"Question: {mc.question}\n{opts}\nCorrect Answer: {mc.answer}"
            for it in p.generation:
                visual = it.mode == "visual"
                instruction = GEN_INSTRUCTION_VISUAL if visual else GEN_INSTRUCTION_TEXTUAL
                yield _chat_(f"{it.question}\n{instruction}", it.ground_truth, visual)
            for it in p.cloze:
                yield _chat_(_format_cloze(it.question), it.ground_truth, it.mode == "visual")
    rows = [r for config in (FT_DATA, *holdout)
            for rs in mllmu.load_training_rows(root, config, verify_images=False).values() for r in rs]
    rows += load_base_set(root, verify_images=False)
    yield from (_chat_(r.question, r.answer, r.image is not None) for r in rows)


def train_synthetic_tokenizer(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int = 2048,
    *,
    image_size: int | None = None,
    min_frequency: int = 2,
    family: str = "llava",
    patch_size: int = 14,
    merge_size: int = 2,
) -> dict[str, Any]:
    """Train the tiny models' tokenizer on the synthetic corpus and write its image preprocessor config.

    family "llava": BPE via `train_tokenizer` (so `<image>`, `<pad>`, `</s>` exist) and a CLIP
    `preprocessor_config.json` for `image_size` (default: the portraits' size). "qwen2_vl":
    `train_qwen2_vl_tokenizer` (its special tokens and chat template) and a Qwen2-VL image
    processor that keeps `image_size`² portraits at their size (`patch_size`·`merge_size` must divide it).
    Both on `corpus_texts(root, family)`. Returns a summary.
    """
    size = image_size if image_size is not None else read_info(root)["image_size"]
    texts = list(corpus_texts(root, family))
    if family == "qwen2_vl":
        factor = patch_size * merge_size
        if size % factor:
            raise ValueError(f"image_size {size} is not a multiple of patch_size·merge_size = {factor}; Qwen2-VL's "
                             "processor would resize the portraits")
        tok = train_qwen2_vl_tokenizer(texts, out_dir, vocab_size=vocab_size, min_frequency=min_frequency)
        write_qwen2_vl_image_processor_config(out_dir, patch_size=patch_size, merge_size=merge_size,
                                              min_pixels=factor * factor, max_pixels=size * size)
        image_token = QWEN2_VL_IMAGE_TOKEN
    else:
        tok = train_tokenizer(texts, out_dir, vocab_size=vocab_size, min_frequency=min_frequency)
        write_image_processor_config(out_dir, size)
        image_token = IMAGE_TOKEN
    return {
        "tokenizer_dir": str(out_dir),
        "texts": len(texts),
        "vocab_size": len(tok),
        "image_token_id": tok.convert_tokens_to_ids(image_token),
        "image_size": size,
    }

