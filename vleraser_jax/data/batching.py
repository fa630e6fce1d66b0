"""Training examples, tokenisation and batch schedules, shared by the training stages and the unlearning methods.

An *example* is {"prompt", "answer", "image" (PNG bytes or None)} in a model family's prompt format; `tokenize`
turns a list of them into fixed-width arrays once (answer-only labels, each image stored once), and a batch
schedule cuts those arrays into fixed-shape batches as a pure function of the step.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np
from PIL import Image

from ..processing import IGNORE_INDEX
from . import mllmu
from .protocol import Prompter


# ------------------------------------------------------------------ examples


def task_example(processor, kind: str, question: str, answer: str, image: bytes | None) -> dict:
    """A training example in the exact prompt the evaluator uses for that kind (plain chat for the rest),
    in the processor's model family's format."""
    if kind in ("classification", "cloze", "generation"):
        prompt = Prompter.for_processor(processor).turn(kind, "visual" if image is not None else "textual", question)
    else:
        prompt = processor.build_prompt(question, with_image=image is not None)
    return {"prompt": prompt, "answer": answer, "image": image}


def qa_example(processor, row: mllmu.TrainingRow) -> dict:
    """A QA row (ft_Data, forget/retain training rows) in the model family's plain chat prompt."""
    return {"prompt": processor.build_prompt(row.question, with_image=row.image is not None), "answer": row.answer,
            "image": row.image}


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
    # extra per-token arrays [N, L] a method attaches (e.g. VL-Eraser's entity mask); batches carry them by name
    token_masks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

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


def tokenize(processor, examples: Sequence[dict], max_length: int, chunk: int = 256, append_eos: bool = True
             ) -> Tokenized:
    """Pre-tokenise once (`collate_for_training` in chunks) and pad to `max_length`; images stored once each.
    append_eos=False labels the answer tokens alone (scoring an answer's likelihood, not training to stop)."""
    if not examples:
        raise ValueError("tokenize: no examples")
    ids = np.full((len(examples), max_length), processor.pad_token_id, np.int32)
    labels = np.full((len(examples), max_length), IGNORE_INDEX, np.int32)
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
                                                for ex, im in zip(part, pil)], max_length=max_length,
                                               append_eos=append_eos)
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
                 "labels": data.labels[rows, :length],
                 **{name: m[rows, :length] for name, m in data.token_masks.items()}}
        if has_image:
            batch.update(data.image_inputs(rows))
        return batch


def group_lengths(*datas) -> dict[bool, int]:
    """{has_image: the longest real row of that kind over `datas`, rounded up to 8} (`epoch_batches`)."""
    out: dict[bool, int] = {}
    for data in datas:
        for has_image in (True, False):
            rows = (data.image_index >= 0) == has_image
            if rows.any():
                length = min(int(-(-data.attention_mask[rows].sum(1).max() // 8) * 8), data.input_ids.shape[1])
                out[has_image] = max(out.get(has_image, 0), length)
    return out


def indexed_batches(data, batch_size: int, rows_by_group: dict[bool, np.ndarray],
                    lengths: dict[bool, int] | None = None) -> list[tuple[np.ndarray, dict]]:
    """[(the batch's real rows, batch)]: the given rows of each group (image rows, then text rows), in that order,
    cut into fixed-shape batches; each group cut to one length (`lengths[has_image]`, default `group_lengths(data)`)
    so it compiles once. A short last batch is filled with copies of its first row whose labels are all ignored:
    they change no NLL, so no gradient."""
    lengths = {**group_lengths(data), **(lengths or {})}
    out = []
    for has_image in (True, False):
        rows = rows_by_group.get(has_image, np.zeros(0, int))
        length = lengths.get(has_image)
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            fill = batch_size - len(part)
            idx = np.concatenate([part, np.repeat(part[:1], fill)])
            labels = data.labels[idx, :length].copy()
            labels[len(part):] = IGNORE_INDEX
            batch = {"input_ids": data.input_ids[idx, :length], "attention_mask": data.attention_mask[idx, :length],
                     "labels": labels, **{name: m[idx, :length] for name, m in data.token_masks.items()}}
            if has_image:
                batch.update(data.image_inputs(idx))
            out.append((part, batch))
    return out


def rows_by_group(data) -> dict[bool, np.ndarray]:
    """{has_image: the rows of that kind, in order}."""
    return {has_image: np.flatnonzero((data.image_index >= 0) == has_image) for has_image in (True, False)}


def epoch_batches(data, batch_size: int, seed: int = 0, lengths: dict[bool, int] | None = None) -> list[dict]:
    """Every row of a `Tokenized` exactly once, in seeded order, in `indexed_batches`' fixed shapes."""
    rng = np.random.default_rng([seed, 11])
    groups = {has_image: rng.permutation(rows) for has_image, rows in rows_by_group(data).items() if len(rows)}
    return [batch for _, batch in indexed_batches(data, batch_size, groups, lengths)]
