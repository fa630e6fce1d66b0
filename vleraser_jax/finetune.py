"""Knowledge injection: the base and vanilla models that unlearning is judged on.

- base: a tiny model trained from random init on the synthetic Base_Set (celebrity facts in every task
  format, captions of random portraits), so it learns the prompt formats and vision↔language alignment
  and knows the "real" celebrities — but none of the fictitious people.
- vanilla: the base model fine-tuned on ft_Data (every fictitious person, image-grounded and name-in-text
  questions), as MLLMU-Bench builds its vanilla model, with a replay share of the base data so the small
  model keeps its celebrities (a 7B model keeps them without help).

Both are saved with `save_pretrained` (loadable in transformers) under `<work_dir>/models/<stage>-<hash>`,
the hash covering every config field the stage depends on, so reruns reuse them. `c.family` picks the
architecture ("llava" or "qwen2_vl": configs/tiny_llava.py, configs/tiny_qwen2vl.py); prompts, tokenizer and
image inputs follow the family's processor. With `model.checkpoint` set (a real model) the base stage is that
checkpoint and the vanilla stage is MLLMU-Bench's LoRA fine-tune (see `run_stage`).

Training-side additions for the tiny models (none changes the evaluation protocol):
- `<stage>.mc_variants`: extra multiple-choice rows for the celebrities, each copy with freshly drawn
  distractors and a freshly dealt correct letter (`synthetic.task_rows`), so a model trained from scratch
  learns the *skill* (find the option that matches the fact) instead of memorising a few hundred letters.
- `vanilla.task_variants` / `vanilla.task_kinds`: **a deviation from MLLMU-Bench**, whose ft_Data holds
  only QA pairs. When > 0, the vanilla fine-tune also sees each fictitious person's facts in the task
  formats (multiple choice with fresh distractors and letters, cloze), in the *training* wording, never
  the evaluation items themselves (the evaluation uses another wording and its own fixed options). A
  7B LLaVA brings the multiple-choice skill from pre-training and applies it to facts it learnt as QA;
  a model trained from scratch in minutes does not transfer it well enough (see configs/tiny_llava.py
  for the measured numbers), so the tiny configs opt in. Set it to 0 for ft_Data alone.
- `<stage>.loss`: "token" (mean over answer tokens, transformers' default) or "example" (each row's mean
  answer-token loss, averaged over rows), so one-letter answers weigh as much as sentences.
- `<stage>.length_buckets`: batches are cut to a few fixed lengths per kind of row (image / text),
  chosen to minimise padding; each length compiles once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from . import parallel
from .data import mllmu, synthetic
from .eval.protocol import Prompter
from .checkpoints import architecture_for, init_params, load_pretrained, load_pretrained_sharded, save_pretrained
from .models.configs import CLIPVisionConfig, LlavaConfig, Qwen2VLConfig, Qwen2VLVisionConfig, TextConfig
from .processing import image_inputs_of, load_processor
from .unlearn import lora as lora_lib
from .unlearn import trainer as tr

STAGES = ("base", "vanilla")
CODE_VERSION = 2  # bump when training code changes what a cached model would contain
# data fields that only choose what is evaluated, not what a stage trains on
_EVAL_ONLY_DATA_FIELDS = ("forget_ratio",)
# stage fields that change how a run executes, not the weights it ends with (a resumed run may change them)
_EXECUTION_ONLY_STAGE_FIELDS = ("save_every",)


# ------------------------------------------------------------------ config -> paths, model


def _plain(config) -> dict:
    return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def stage_key(c, stage: str) -> str:
    """A short hash of everything the stage's result depends on (and nothing else)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    data = {k: v for k, v in _plain(c.data).items() if k not in _EVAL_ONLY_DATA_FIELDS}
    sections = {name: {k: v for k, v in _plain(c.get(name) or {}).items() if k not in _EXECUTION_ONLY_STAGE_FIELDS}
                for name in STAGES}
    parts = {"code": CODE_VERSION, "seed": c.seed, "data": data, "model": _plain(c.model), "base": sections["base"]}
    if c.get("family", "llava") != "llava":  # LLaVA's keys predate the field; they stay valid
        parts["family"] = c.family
    if stage == "vanilla":
        parts["vanilla"] = sections["vanilla"]
    return _hash(parts)


def _synthetic_params(c) -> dict:
    d = c.data
    return {"seed": c.seed, "num_people": d.num_people, "num_celebrities": d.num_celebrities,
            "image_size": d.image_size, "num_base_portraits": d.num_base_portraits,
            "num_base_poses": d.num_base_poses}


def data_root(c) -> Path:
    """The benchmark root: `data.root`, or a synthetic one keyed by its generator parameters."""
    if c.data.root:
        return Path(c.data.root)
    if c.data.source != "synthetic":
        raise ValueError(f"data.root must be set (a local MLLMU-Bench copy) for data.source={c.data.source!r}")
    key = _hash({**_synthetic_params(c), "version": synthetic.GENERATOR_VERSION, "vocab_size": c.data.vocab_size})
    return Path(c.work_dir) / f"synthetic-{c.seed}-{key[:8]}"


def stage_dir(c, stage: str) -> Path:
    return Path(c.work_dir) / "models" / f"{c.name}-{stage}-{stage_key(c, stage)}"


def prepare_data(c, log=print) -> tuple[Path, Path]:
    """The benchmark root and the tokenizer directory, synthesizing them if missing."""
    root = data_root(c)
    if c.data.source != "synthetic":
        if not root.is_dir():
            raise FileNotFoundError(f"data.root {root} does not exist (data.source={c.data.source!r})")
        return root, Path(c.model.checkpoint)
    want = _synthetic_params(c)
    if (root / synthetic.INFO_FILE).exists():
        info = synthetic.read_info(root)
        have = {k: info.get(k) for k in want}
        if have != want or info.get("version") != synthetic.GENERATOR_VERSION:
            raise ValueError(f"{root} holds a synthetic benchmark made with {have} (version {info.get('version')}), "
                             f"not the config's {want} (version {synthetic.GENERATOR_VERSION})")
    else:
        log(f"writing the synthetic benchmark to {root}")
        synthetic.synthesize(root, **want, overwrite=True)
    family = c.get("family", "llava")
    if family == "llava":
        tok_dir = root / "tokenizer"
        extra = {}
    else:  # its image processor depends on the patch and merge sizes
        tok_dir = root / f"tokenizer-{family}-p{c.model.patch_size}m{c.model.merge_size}"
        extra = {"patch_size": c.model.patch_size, "merge_size": c.model.merge_size}
    if not (tok_dir / "tokenizer.json").exists():
        log(f"training the {family} tokenizer into {tok_dir}")
        synthetic.train_synthetic_tokenizer(root, tok_dir, vocab_size=c.data.vocab_size, image_size=c.data.image_size,
                                            family=family, **extra)
    return root, tok_dir


def model_config(c, tokenizer) -> LlavaConfig | Qwen2VLConfig:
    """The tiny model of `c.family` ("llava" | "qwen2_vl") from `c.model`'s sizes and the tokenizer's ids."""
    family = c.get("family", "llava")
    if family == "qwen2_vl":
        return _qwen2_vl_config(c, tokenizer)
    if family != "llava":
        raise ValueError(f"family must be 'llava' or 'qwen2_vl', got {family!r}")
    m = c.model
    vision = CLIPVisionConfig(
        hidden_size=m.vision_hidden_size, intermediate_size=m.vision_intermediate_size,
        num_hidden_layers=m.vision_layers, num_attention_heads=m.vision_heads,
        image_size=c.data.image_size, patch_size=m.patch_size, projection_dim=m.vision_hidden_size,
    )
    text = TextConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
        head_dim=m.hidden_size // m.heads, max_position_embeddings=m.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    return LlavaConfig(vision=vision, text=text, image_token_index=image_token,
                       image_seq_length=vision.num_patches, vision_feature_layer=m.vision_feature_layer,
                       dtype=m.dtype, attention_impl=m.attention)


def _qwen2_vl_config(c, tokenizer) -> Qwen2VLConfig:
    """Qwen2-VL at toy width: a ViT of `vision_*` sizes whose patch merger feeds a Qwen2 decoder (q/k/v biases,
    M-RoPE split by `model.mrope_section`)."""
    from .processing import QWEN2_VL_SPECIAL_TOKENS

    m = c.model
    if m.vision_intermediate_size % m.vision_hidden_size:  # transformers' config stores an integer mlp_ratio
        raise ValueError(f"model.vision_intermediate_size {m.vision_intermediate_size} must be a multiple of "
                         f"model.vision_hidden_size {m.vision_hidden_size} for Qwen2-VL")
    vision = Qwen2VLVisionConfig(
        depth=m.vision_layers, embed_dim=m.vision_hidden_size, hidden_size=m.hidden_size, num_heads=m.vision_heads,
        mlp_ratio=m.vision_intermediate_size // m.vision_hidden_size, patch_size=m.patch_size,
        spatial_merge_size=m.merge_size,
    )
    text = TextConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
        head_dim=m.hidden_size // m.heads, max_position_embeddings=m.max_position_embeddings, qkv_bias=True,
        model_type="qwen2_vl_text",
        rope=(("mrope_section", tuple(m.mrope_section)), ("rope_theta", float(m.rope_theta)), ("rope_type", "default")),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
        QWEN2_VL_SPECIAL_TOKENS[2:])}
    return Qwen2VLConfig(vision=vision, text=text, **ids, dtype=m.dtype, attention_impl=m.attention)


def init_from_scratch(model, seed: int, std: float = 0.02) -> dict:
    """transformers-style init: N(0, std) matrices and embeddings, zero biases, unit norm scales.

    Shapes come from `jax.eval_shape` (nothing is run) and values from numpy's seeded generator, one
    stream per parameter path: no per-shape compilation, so this takes milliseconds, not seconds.
    """
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(seed)))
    out = {}
    for path, value in traverse_util.flatten_dict(shapes).items():
        name = path[-1]
        if name == "scale":
            array = np.ones(value.shape, value.dtype)
        elif name == "bias":
            array = np.zeros(value.shape, value.dtype)
        else:
            stream = int.from_bytes(hashlib.sha256("/".join(path).encode()).digest()[:4], "little")
            array = (std * np.random.default_rng([seed, stream]).standard_normal(value.shape)).astype(value.dtype)
        out[path] = jnp.asarray(array)
    return traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------ examples


def task_example(processor, kind: str, question: str, answer: str, image: bytes | None) -> dict:
    """A training example in the exact prompt the evaluator uses for that kind (plain chat for the rest),
    in the processor's model family's format."""
    if kind in ("classification", "cloze", "generation"):
        prompt = Prompter.for_processor(processor).turn(kind, "visual" if image is not None else "textual", question)
    else:
        prompt = processor.build_prompt(question, with_image=image is not None)
    return {"prompt": prompt, "answer": answer, "image": image}


def base_example(processor, row: mllmu.TrainingRow, kind: str) -> dict:
    """A Base_Set row in the exact prompt format the evaluator will use for that kind."""
    return task_example(processor, kind, row.question, row.answer, row.image)


def qa_example(processor, row: mllmu.TrainingRow) -> dict:
    """A QA row (ft_Data, forget/retain training rows) in the model family's plain chat prompt."""
    return {"prompt": processor.build_prompt(row.question, with_image=row.image is not None), "answer": row.answer,
            "image": row.image}


def augmented_task_examples(processor, people: Sequence[synthetic.Person], images: dict[str, Sequence[bytes]],
                            variants: int, kinds: Sequence[str], seed: int, tag: str) -> list[dict]:
    """`variants` copies of every person's task rows (`synthetic.task_rows`), each copy with fresh options.

    Distractors (other people's names for the name question) come from `people`; visual rows cycle
    through the person's `images`. Deterministic in (seed, tag).
    """
    names = [p.name for p in people]
    out = []
    for v in range(variants):
        rng = random.Random(f"vleraser-finetune/{seed}/{tag}/{v}")
        for p in people:
            shots = images[p.person_id]
            turn = itertools.cycle(shots[v % len(shots):] + shots[: v % len(shots)])
            for kind, visual, q, a in synthetic.task_rows(p, names, rng, kinds=kinds):
                out.append(task_example(processor, kind, q, a, next(turn) if visual else None))
    return out


# ------------------------------------------------------------------ tokenised data and batches


@dataclasses.dataclass
class Tokenized:
    input_ids: np.ndarray  # [N, L] right-padded
    labels: np.ndarray  # [N, L]
    attention_mask: np.ndarray
    image_index: np.ndarray  # [N] row of `pixels`, -1 for text-only
    # one entry per image: LLaVA [M, C, H, W]; Qwen2-VL [M, patches, C·t·p·p], or a list of [patches_i, C·t·p·p]
    # when images keep different resolutions (each distinct batch total then compiles once)
    pixels: np.ndarray | list[np.ndarray] | None
    grids: np.ndarray | None = None  # Qwen2-VL's image_grid_thw per image [M, 3]; None for LLaVA

    def __len__(self) -> int:
        return len(self.input_ids)

    def image_inputs(self, rows) -> dict[str, np.ndarray]:
        """The model's image inputs for these rows (each must have an image), in row order."""
        images = self.image_index[rows]
        if self.grids is None:
            return {"pixel_values": self.pixels[images]}
        patches = np.concatenate([self.pixels[i] for i in images]) if isinstance(self.pixels, list) else \
            self.pixels[images].reshape(-1, self.pixels.shape[-1])
        return {"pixel_values": patches, "image_grid_thw": self.grids[images]}


def tokenize(processor, examples: Sequence[dict], max_length: int, chunk: int = 256) -> Tokenized:
    """Pre-tokenise once (`collate_for_training` in chunks) and pad to `max_length`; images stored once each."""
    if not examples:
        raise ValueError("tokenize: no examples")
    ids = np.full((len(examples), max_length), processor.pad_token_id, np.int32)
    labels = np.full((len(examples), max_length), tr.IGNORE_INDEX, np.int32)
    masks = np.zeros((len(examples), max_length), np.int32)
    image_index = np.full(len(examples), -1)
    images, grids, seen = [], [], {}
    decoded: dict[bytes, Image.Image] = {}
    for start in range(0, len(examples), chunk):
        part = examples[start: start + chunk]
        pil = []
        for ex in part:
            image = ex["image"]
            if image is not None and image not in decoded:
                decoded[image] = Image.open(io.BytesIO(image)).convert("RGB")
            pil.append(None if image is None else decoded[image])
        batch = processor.collate_for_training([{"prompt": ex["prompt"], "answer": ex["answer"], "image": im}
                                                for ex, im in zip(part, pil)], max_length=max_length)
        n = batch["input_ids"].shape[1]
        rows = slice(start, start + len(part))
        ids[rows, :n], labels[rows, :n], masks[rows, :n] = batch["input_ids"], batch["labels"], batch["attention_mask"]
        per_image = split_images(batch)  # this chunk's images in example order
        k = 0
        for i, ex in enumerate(part):
            image = ex["image"]
            if image is None:
                continue
            if image not in seen:
                seen[image] = len(images)
                images.append(per_image[k][0])
                grids.append(per_image[k][1])
            image_index[start + i] = seen[image]
            k += 1
    if not images:
        return Tokenized(ids, labels, masks, image_index, None)
    if grids[0] is None:  # LLaVA: every image is processed to the same crop
        return Tokenized(ids, labels, masks, image_index, np.stack(images).astype(np.float32))
    grid_array = np.stack(grids).astype(np.int32)
    if len({im.shape for im in images}) == 1:
        return Tokenized(ids, labels, masks, image_index, np.stack(images).astype(np.float32), grid_array)
    return Tokenized(ids, labels, masks, image_index, [im.astype(np.float32) for im in images], grid_array)


def split_images(batch: dict) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(pixels, grid) of every image of a processor batch, in order. LLaVA's pixel_values are one
    [C, H, W] per image; Qwen2-VL's are all images' patches concatenated, split by image_grid_thw."""
    if "pixel_values" not in batch:
        return []
    if "image_grid_thw" not in batch:
        return [(p, None) for p in batch["pixel_values"]]
    grid = np.asarray(batch["image_grid_thw"])
    ends = np.cumsum(np.prod(grid, axis=-1))
    return [(batch["pixel_values"][e - n: e], g) for g, e, n in zip(grid, ends, np.prod(grid, axis=-1))]


def bucket_edges(lengths: Sequence[int], max_buckets: int, min_rows: int = 1, multiple: int = 8) -> list[int]:
    """At most `max_buckets` batch lengths (multiples of `multiple`) covering `lengths` with least padding.

    Each bucket but possibly the longest holds at least `min_rows` rows (so it fills a batch).
    """
    lengths = np.asarray(lengths)
    rounded = -(-lengths // multiple) * multiple
    cands = np.unique(rounded)
    counts = np.array([(rounded == v).sum() for v in cands])
    m = len(cands)
    inf = float("inf")
    # best[k][j]: least padded tokens for rows up to cands[j] with k buckets, the last ending at cands[j]
    best = [[inf] * m for _ in range(max_buckets + 1)]
    back = [[-1] * m for _ in range(max_buckets + 1)]
    for j in range(m):
        rows = counts[: j + 1].sum()
        if rows >= min_rows or j == m - 1:
            best[1][j] = rows * cands[j]
    for k in range(2, max_buckets + 1):
        for j in range(m):
            for i in range(j):
                rows = counts[i + 1: j + 1].sum()
                if best[k - 1][i] < inf and (rows >= min_rows or j == m - 1):
                    cost = best[k - 1][i] + rows * cands[j]
                    if cost < best[k][j]:
                        best[k][j], back[k][j] = cost, i
    k = min(range(1, max_buckets + 1), key=lambda k: best[k][m - 1])
    edges, j = [], m - 1
    while j >= 0 and k >= 1:
        edges.append(int(cands[j]))
        j, k = back[k][j], k - 1
    return sorted(edges)


class BatchSchedule:
    """`batch(step)`: a pure function of the step over fixed-shape batches.

    Rows with and without an image never share a batch (no dummy images). Within each of those two
    groups, rows are cut into at most `length_buckets` lengths (chosen over all sources together to
    minimise padding; rounded up to 8): a few compiled shapes, little padding. A pool is (source, image or
    not, length bucket); each step's pool is drawn in proportion to the pools' sizes times their source's
    weight; rows within a pool go epoch by epoch through seeded permutations.
    """

    def __init__(self, sources: Sequence[tuple[Tokenized, float]], batch_size: int, steps: int, seed: int,
                 length_buckets: int = 1):
        self.batch_size = batch_size
        self.pools = []  # (tokenized, row indices, has_image, length)
        weights = []
        for has_image in (True, False):
            picked = [(data, weight, np.flatnonzero((data.image_index >= 0) == has_image)) for data, weight in sources]
            picked = [(d, w, rows) for d, w, rows in picked if len(rows) and w > 0]
            if not picked:
                continue
            lengths = np.concatenate([d.attention_mask[rows].sum(1) for d, _, rows in picked])
            edges = bucket_edges(lengths, length_buckets, min_rows=batch_size)
            for data, weight, rows in picked:
                row_len = data.attention_mask[rows].sum(1)
                lower = 0
                for edge in edges:
                    inside = rows[(row_len > lower) & (row_len <= edge)]
                    lower = edge
                    if len(inside):
                        self.pools.append((data, inside, has_image, edge))
                        weights.append(weight * len(inside))
        if not self.pools:
            raise ValueError("no training rows")
        rng = np.random.default_rng(seed)
        p = np.asarray(weights) / np.sum(weights)
        self.pool_of_step = rng.choice(len(self.pools), size=steps, p=p)
        self.orders = []
        for k, (_, rows, _, _) in enumerate(self.pools):
            needed = int((self.pool_of_step == k).sum()) * batch_size
            epochs = -(-needed // len(rows)) + 1
            order = np.concatenate([np.random.default_rng([seed, k, e]).permutation(rows) for e in range(epochs)])
            self.orders.append(order)
        counts = np.zeros(len(self.pools), int)
        self.start = np.zeros(steps, int)
        for step, k in enumerate(self.pool_of_step):
            self.start[step] = counts[k]
            counts[k] += batch_size

    @property
    def shapes(self) -> list[tuple[bool, int]]:
        """The distinct (has_image, length) batch shapes, one compiled program each."""
        return sorted({(has_image, length) for _, _, has_image, length in self.pools})

    def padding_fraction(self) -> float:
        """The share of the scheduled batches' tokens that are padding."""
        real = total = 0
        for k, (data, rows, _, length) in enumerate(self.pools):
            steps = np.flatnonzero(self.pool_of_step == k)
            picked = np.concatenate([self.orders[k][self.start[s]: self.start[s] + self.batch_size] for s in steps]) \
                if len(steps) else np.zeros(0, int)
            real += int(data.attention_mask[picked].sum())
            total += len(picked) * length
        return 1 - real / max(total, 1)

    def __call__(self, step: int) -> dict:
        k = self.pool_of_step[step]
        data, _, has_image, length = self.pools[k]
        rows = self.orders[k][self.start[step]: self.start[step] + self.batch_size]
        batch = {"input_ids": data.input_ids[rows, :length], "attention_mask": data.attention_mask[rows, :length],
                 "labels": data.labels[rows, :length]}
        if has_image:
            batch.update(data.image_inputs(rows))
        return batch


LOSSES = ("token", "example")


def lm_loss_fn(model, loss: str = "token", lora: bool = False):
    """Next-token loss on answer tokens: mean over tokens ("token") or mean of each row's mean ("example").

    lora=False: trainable and frozen are complementary parameter subtrees. lora=True: trainable is a LoRA's
    a/b matrices and frozen is {"params": the model, "lora_scales": the LoRA's scales}.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    def loss_fn(frozen, trainable, batch, rng):
        if lora:
            variables = {"params": frozen["params"], "lora": tr.merge(trainable, frozen["lora_scales"])}
        else:
            variables = {"params": tr.merge(trainable, frozen)}
        logits = model.apply(variables, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             **image_inputs_of(batch)).logits
        if loss == "token":
            return tr.causal_lm_loss(logits, batch["labels"]), {}
        nll, count = tr.token_nll(logits, batch["labels"])
        return jnp.mean(nll / jnp.maximum(count, 1.0)), {}

    return loss_fn


# ------------------------------------------------------------------ stages


def processor_dir(config, tok_dir: Path, path: Path) -> Path:
    """A directory `load_processor` accepts: the tokenizer files plus this model's config.json."""
    path.mkdir(parents=True, exist_ok=True)
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, path / f.name)
    (path / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    return path


def _celebrities(root: Path) -> tuple[list[synthetic.Person], dict[str, list[bytes]]]:
    """The celebrities (Retain_Set biographies) and every image of each: the Retain_Set portrait, then Base_Set's poses."""
    profiles = mllmu.load_profiles(root, mllmu.RETAIN_SET)
    images = {p.person_id: [p.image] for p in profiles}
    for row in synthetic.load_base_set(root, kinds=("qa",)):
        if row.image is not None and row.person_id in images and row.image not in images[row.person_id]:
            images[row.person_id].append(row.image)
    return [synthetic.person_from_profile(p) for p in profiles], images


def base_examples(c, root: Path, sc, processor) -> list[dict]:
    """The base data: Base_Set, plus `sc.mc_variants` freshly drawn multiple-choice copies per celebrity item."""
    if c.data.source != "synthetic":
        return []
    examples = [base_example(processor, r, kind)
                for kind in synthetic.BASE_KINDS for r in synthetic.load_base_set(root, kinds=(kind,))]
    if sc.mc_variants:
        people, images = _celebrities(root)
        examples += augmented_task_examples(processor, people, images, sc.mc_variants, ("classification",), c.seed,
                                            "celebrities")
    return examples


def vanilla_task_examples(c, root: Path, bench: mllmu.Benchmark, processor) -> list[dict]:
    """The deviation (see the module docstring): the fictitious people's facts in task formats, training wording."""
    v = c.vanilla
    if not v.get("task_variants", 0):
        return []
    if c.data.source != "synthetic":
        raise ValueError("vanilla.task_variants > 0 needs the synthetic benchmark (its question templates)")
    profiles = mllmu.load_profiles(root, mllmu.FULL_SET)
    people = [synthetic.person_from_profile(p) for p in profiles]
    images = {p.person_id: [p.image] for p in profiles}
    return augmented_task_examples(processor, people, images, v.task_variants, tuple(v.task_kinds), c.seed,
                                   "fictitious")


def model_runtime(c) -> dict:
    """How a loaded checkpoint runs (compute dtype, attention backend, remat policy), from `c.model`."""
    return {"dtype": c.model.dtype, "attention_impl": c.model.attention, "remat": c.model.get("remat")}


def run_stage(c, stage: str, *, force: bool = False, log=print) -> Path:
    """Train (or reuse) one stage; returns its checkpoint directory.

    With `model.checkpoint` set (a real model, e.g. the 7B configs) the base stage *is* that checkpoint and
    only the vanilla stage trains. `<stage>.lora_rank` > 0 trains a LoRA on `<stage>.lora_pattern` (default:
    every LM linear, MLLMU-Bench's recipe) and merges it into the saved weights; `<stage>.epochs` sets the
    step count from the data size when `<stage>.steps` is absent.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "base" and c.model.get("checkpoint"):
        base = Path(c.model.checkpoint)
        if not (base / "config.json").is_file():
            raise FileNotFoundError(f"model.checkpoint {base} has no config.json")
        log(f"base: the pretrained checkpoint {base}")
        return base
    out = stage_dir(c, stage)
    if (out / "config.json").exists() and not force:
        log(f"{stage}: reusing {out}")
        return out
    root, tok_dir = prepare_data(c, log)
    if c.data.source != "synthetic" and not c.model.get("checkpoint"):
        raise ValueError(f"model.checkpoint must be set (a local Hugging Face model directory) to train on "
                         f"data.source={c.data.source!r}; only the synthetic benchmark trains a base model from scratch")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    sharding = parallel.sharder_for(c)
    if stage == "base":
        config = model_config(c, tokenizer)
        model = architecture_for(config.model_type).model_cls(config)
        params = init_from_scratch(model, c.seed)
        proc_dir = processor_dir(config, tok_dir, out.with_name(out.name + ".processor"))
    else:
        base_dir = run_stage(c, "base", log=log)
        if sharding is not None:  # each process reads only its shards of the base model
            model, params, config = load_pretrained_sharded(base_dir, sharding, **model_runtime(c))
        else:
            model, params, config = load_pretrained(base_dir, **model_runtime(c))
        proc_dir = base_dir
    processor = load_processor(proc_dir)
    sc = getattr(c, stage)
    max_length = sc.max_length

    t0 = time.perf_counter()
    if stage == "base":
        sources = [(tokenize(processor, base_examples(c, root, sc, processor), max_length), 1.0)]
    else:
        bench = mllmu.load_benchmark(root, c.data.forget_ratio)
        ft_examples = [qa_example(processor, r) for r in bench.full_train] + \
            vanilla_task_examples(c, root, bench, processor)
        ft = tokenize(processor, ft_examples, max_length)
        sources = [(ft, 1.0)]
        replay = sc.get("base_replay", 0.0)
        replay_examples = base_examples(c, root, c.base, processor) if replay > 0 else []
        if replay_examples:
            replay_data = tokenize(processor, replay_examples, max_length)
            # weight so that a `base_replay` share of the steps draw from the base data
            sources.append((replay_data, replay / (1 - replay) * len(ft) / len(replay_data)))
    steps = stage_steps(sc, sum(len(d) for d, _ in sources))
    schedule = BatchSchedule(sources, sc.batch_size, steps, c.seed, length_buckets=sc.get("length_buckets", 1))
    log(f"{stage}: {' + '.join(str(len(d)) for d, _ in sources)} rows tokenized in {time.perf_counter() - t0:.1f} s; "
        f"batch shapes {schedule.shapes}, {schedule.padding_fraction():.0%} padding")
    defaults = tr.TrainConfig(total_steps=steps)
    save_every = sc.get("save_every", 0)
    checkpoints = out.with_name(out.name + ".ckpt")
    if force and checkpoints.exists():  # retrain from scratch, not from the last run's saved steps
        shutil.rmtree(checkpoints)
    train_cfg = tr.TrainConfig(
        total_steps=steps, learning_rate=sc.learning_rate, seed=c.seed, log_every=max(steps // 40, 1),
        **{name: sc.get(name, getattr(defaults, name))
           for name in ("warmup_steps", "schedule", "end_lr_factor", "weight_decay")},
        lr_multipliers=tuple((str(pattern), float(f)) for pattern, f in sc.get("lr_multipliers", ())),
        # periodic orbax saves make a long (7B) run resumable: rerunning the command continues it
        checkpoint_dir=str(checkpoints) if save_every else None, save_every=save_every,
        description=f"{stage} model", log_path=str(out.with_name(out.name + ".train.jsonl")),
    )
    out.parent.mkdir(parents=True, exist_ok=True)  # the logs sit beside the model
    rank = sc.get("lora_rank", 0)
    if rank:
        lora = lora_lib.init(params, rank, float(sc.get("lora_alpha", rank)), jax.random.PRNGKey(c.seed),
                             pattern=sc.get("lora_pattern", lora_lib.LM_LINEARS))
        trainable, scales = lora_lib.split_trainable(lora)
        frozen = {"params": params, "lora_scales": scales}
    else:
        trainable, frozen = tr.partition(params, ".*")
    loss = lm_loss_fn(model, sc.get("loss", "token"), lora=bool(rank))
    result = tr.train(loss, trainable, frozen, schedule, train_cfg, sharding=sharding)
    if rank:
        params = lora_lib.merge(params, tr.merge(result.trainable, frozen["lora_scales"]))
    else:
        params = tr.merge(result.trainable, frozen)
    save_pretrained(params, config, out, copy_files_from=tok_dir)
    # the exported model is the result now; a finished run's optimizer checkpoints would only be restored
    # (with zero steps left) by a forced rerun
    shutil.rmtree(checkpoints, ignore_errors=True)
    final_loss = result.history[-1]["loss"] if result.history else None  # None: every step came from a checkpoint
    meta = {"stage": stage, "seconds": result.seconds, "final_loss": final_loss, "key": stage_key(c, stage),
            "steps": steps, "lora_rank": rank, "resumed_from": result.resumed_from}
    (out.with_name(out.name + ".json")).write_text(json.dumps(meta, indent=2))
    what = f"a rank-{rank} LoRA (merged)" if rank else "every parameter"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    loss = f"final loss {final_loss:.3f}" if final_loss is not None else "no step left to run"
    log(f"{stage}: trained {what} for {steps} steps in {result.seconds:.0f} s ({loss}{resumed}) -> {out}")
    return out


def stage_steps(sc, rows: int) -> int:
    """`sc.steps`, or `sc.epochs` passes over `rows` training rows at `sc.batch_size` (MLLMU-Bench counts epochs)."""
    if sc.get("steps"):
        return int(sc.steps)
    if sc.get("epochs"):
        return max(1, -(-int(sc.epochs * rows) // sc.batch_size))
    raise ValueError("a training stage needs `steps` or `epochs`")
