"""`likelihood.score_options` (the prompt once per item, each option a cached chunk after it) gives what scoring
every prompt + option sequence on its own gives (`score_answers`), for LLaVA and Qwen2-VL: image and text items,
multi-token options of different lengths, items with fewer options, a part-filled last batch."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.eval.likelihood import option_examples, score_answers, score_options
from vleraser_jax.processing import load_processor

OPTIONS = [
    {"A": "Paris", "B": "Rome", "C": "a small town near the coast", "D": "1970"},
    {"A": "marine biologist", "B": "Oslo", "C": "Lima", "D": "He was born in Springfield"},
    {"A": "Alice Smith", "B": "B", "C": "Rome and Paris"},  # three options: its own group
]


def _png(seed: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _items(prompt_of, image_size):
    items = []
    for i in range(7):
        image = _png(i, image_size) if i % 2 == 0 else None
        question = ["Where was this person born?", "Which city?", "What does the person do for a living?"][i % 3]
        items.append((prompt_of(question, image is not None), image, OPTIONS[i % 3]))
    return items


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    from qwen2_vl_helpers import write_tiny_qwen2_vl_dir
    from test_qwen2_vl_processing import MERGE, PATCH, SENTENCES

    return write_tiny_qwen2_vl_dir(tmp_path_factory.mktemp("qwen_options"), SENTENCES, patch=PATCH, merge=MERGE,
                                   weights=True)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def family_setup(request, full_checkpoint, qwen_checkpoint):
    from vleraser_jax.data.protocol import Prompter

    root = full_checkpoint if request.param == "llava" else qwen_checkpoint
    model, params, _ = load_pretrained(root)
    processor = load_processor(root)
    prompter = Prompter.for_processor(processor)
    image_size = 28 if request.param == "llava" else 16

    def prompt_of(question, with_image):
        from vleraser_jax.data.mllmu import MultipleChoice

        item = MultipleChoice(question=question, options=OPTIONS[0], answer="A")
        return prompter.option(item, "visual" if with_image else "textual", b"x" if with_image else None).text

    return model, params, processor, _items(prompt_of, image_size)


def test_prefix_shared_scores_equal_scoring_each_option_alone(family_setup):
    model, params, processor, items = family_setup
    shared = score_options(model, params, processor, items, batch_size=2)
    examples = [ex for prompt, image, options in items for ex in option_examples(prompt, image, options)]
    alone = score_answers(model, params, processor, examples, batch_size=4)
    k = 0
    for (_, _, options), scores in zip(items, shared):
        assert len(scores) == len(options)
        for ours in scores:
            ref = alone[k]
            k += 1
            assert len(ours.logprob) == len(ref.logprob) >= 1
            np.testing.assert_allclose(ours.logprob, ref.logprob, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(ours.vocab_mean, ref.vocab_mean, rtol=1e-5, atol=1e-5)
            # var = E[log p²] − mean² cancels in f32: compare the second moment it is computed from
            np.testing.assert_allclose(ours.vocab_var + ours.vocab_mean ** 2, ref.vocab_var + ref.vocab_mean ** 2,
                                       rtol=1e-5)
    assert k == len(alone)
    assert any(len(s.logprob) > 2 for scores in shared for s in scores)  # multi-token options were scored


def test_no_items_no_work(family_setup):
    model, params, processor, _ = family_setup
    assert score_options(model, params, processor, []) == []
