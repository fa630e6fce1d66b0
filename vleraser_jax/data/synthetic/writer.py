"""Writing the synthetic benchmark in MLLMU-Bench's layout (plus our Base_Set), and reading it back."""

from __future__ import annotations

import json
import os
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import mllmu
from ..splits import HOLDOUT_SET, holdout_features
from ..mllmu import (FT_DATA, FULL_SET, RETAIN_SET, TEST_SET, TrainingRow, config_features, forget_config,
                     retain_config)
from .people import (EVAL, FACT_KEYS, FACT_POOLS, FACT_VALUE_MODES, TEST, TRAIN, VISUAL_SUBJECT, Person, _names,
                     _people, _people_with, _stream, _subject, answer_sentence, question, require_unique_capacity,
                     unique_fact_values)
from .portraits import (_ATTRIBUTE_QUESTIONS, _CAPTION_QUESTIONS, Look, _attribute_answer, _distinct_looks, _new_scene,
                        _png, _random_look, _random_pose, describe_look, render_portrait)
from .tasks import TASK_KINDS, _LetterDealer, _summary_qa, _tasks, _training_pairs, task_rows


BASE_SET = "Base_Set"
INFO_FILE = "synthetic_info.json"
BASE_KINDS = ("qa", "classification", "generation", "cloze", "caption", "attribute")
SPLIT_RATIOS = (5, 10, 15)  # in the order data_split.py draws them
GENERATOR_VERSION = 4  # 4: Holdout_Set (existing configs unchanged)


def _image(b: bytes | None) -> dict[str, Any] | None:
    return None if b is None else {"bytes": b, "path": None}


# ----------------------------------------------------------------------------- writing


def base_set_features():
    """Features of our Base_Set config (image is null on text-only rows)."""
    from datasets import Features, Image, Value

    s = Value("string")
    return Features({"image": Image(), "ID": s, "kind": s, "question": s, "answer": s})


def _write(out: Path, config: str, rows: list[dict[str, Any]], features) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = out / config
    folder.mkdir(parents=True, exist_ok=True)
    # The schema carries datasets' `huggingface` metadata, so Image columns load as Image features.
    table = pa.Table.from_pylist(rows, schema=features.arrow_schema)
    pq.write_table(table, folder / "train-00000-of-00001.parquet")


def _configs() -> list[str]:
    return [FULL_SET, FT_DATA, TEST_SET, RETAIN_SET, BASE_SET, HOLDOUT_SET,
            *(forget_config(r) for r in SPLIT_RATIOS), *(retain_config(r) for r in SPLIT_RATIOS)]


def _check_arguments(num_people, num_celebrities, image_size, num_test_images, num_base_portraits, num_base_poses,
                     num_holdout, fact_values):
    if fact_values not in FACT_VALUE_MODES:
        raise ValueError(f"fact_values={fact_values!r}; expected one of {FACT_VALUE_MODES}")
    if fact_values == "unique":
        require_unique_capacity(num_people + num_celebrities + num_holdout)
    if num_holdout < 0:
        raise ValueError(f"num_holdout={num_holdout} must be >= 0")
    if num_people < 20 or num_celebrities < 4:
        raise ValueError(f"num_people={num_people} (>= 20, so forget_5 is not empty) and "
                         f"num_celebrities={num_celebrities} (>= 4, for name distractors) are too small")
    if image_size < 16 or num_test_images < 1 or num_base_portraits < 0 or num_base_poses < 0:
        raise ValueError(f"image_size={image_size} (>= 16), num_test_images={num_test_images} (>= 1), "
                         f"num_base_portraits={num_base_portraits}, num_base_poses={num_base_poses} (>= 0)")


def _clear(out: Path, overwrite: bool) -> None:
    existing = [p for c in _configs() for p in sorted((out / c).glob("*.parquet"))]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} parquet file(s) (e.g. {existing[0]}); "
                              "pass overwrite=True to replace them")
    for p in existing:
        p.unlink()


def _fictitious_rows(people: list[Person], seed: int, image_size: int, num_test_images: int, pools, bar: Any):
    """(Full_Set, ft_Data, Test_Set) rows of the fictitious people."""
    names = [p.name for p in people]
    rng_eval, rng_test = _stream(seed, "eval"), _stream(seed, "test")
    deal_eval, deal_test = _LetterDealer(rng_eval), _LetterDealer(rng_test)
    full, ft, test = [], [], []
    for p in people:
        image = _png(render_portrait(p.look, image_size))
        q, a = _summary_qa(p)
        row = {"image": _image(image), "ID": p.person_id, "biography": p.biography(), "question": q, "answer": a,
               **_tasks(p, names, EVAL, rng_eval, deal_eval, pools)}
        full.append({"image": row["image"], "ID": p.person_id, "Directory": f"data_original/{p.person_id}.png",
                     **{k: v for k, v in row.items() if k not in ("image", "ID")}})
        ft.append({"image": row["image"], "ID": p.person_id, "metadata": json.dumps(_training_pairs(p))})
        shots = [_png(render_portrait(_new_scene(p.look, rng_test), image_size, _random_pose(rng_test)))
                 for _ in range(num_test_images)]
        test.append({"images": [_image(b) for b in shots], "ID": p.person_id, "biography": p.biography(),
                     "question": q, "answer": a, **_tasks(p, names, TEST, rng_test, deal_test, pools)})
        bar.update()
    return full, ft, test


def _holdout_rows(holdout: list[Person], names: list[str], seed: int, image_size: int,
                  pools) -> list[dict[str, Any]]:
    """Holdout_Set rows: Full_Set's columns (the eval wording's task items) plus ft_Data's `metadata` (the
    training wording's QA pairs, which no stage trains on)."""
    rng = _stream(seed, "holdout")
    deal = _LetterDealer(rng)
    rows = []
    for p in holdout:
        q, a = _summary_qa(p)
        rows.append({"image": _image(_png(render_portrait(p.look, image_size))), "ID": p.person_id,
                     "Directory": f"data_holdout/{p.person_id}.png", "biography": p.biography(), "question": q,
                     "answer": a, **_tasks(p, names, EVAL, rng, deal, pools),
                     "metadata": json.dumps(_training_pairs(p))})
    return rows


def _celebrity_rows(celebs: list[Person], seed: int, image_size: int, pools):
    """(Retain_Set rows, {celebrity id: portrait PNG})."""
    celeb_names = [p.name for p in celebs]
    rng_real = _stream(seed, "real")
    deal_real = _LetterDealer(rng_real)
    real, celeb_images = [], {}
    for p in celebs:
        image = _png(render_portrait(p.look, image_size))
        celeb_images[p.person_id] = image
        q, a = _summary_qa(p)
        real.append({"image": _image(image), "ID": p.person_id, "Directory": f"data_celebrity/{p.person_id}.png",
                     "biography": p.biography(), "question": q, "answer": a,
                     **_tasks(p, celeb_names, EVAL, rng_real, deal_real, pools)})
    return real, celeb_images


def _splits(ids: list[str], seed: int) -> dict[str, list[str]]:
    """data_split.py: one list, shuffled again before each ratio; forget = first int(r% * n)."""
    order = list(ids)
    rng_split = _stream(seed, "splits")
    splits: dict[str, list[str]] = {}
    for ratio in SPLIT_RATIOS:
        rng_split.shuffle(order)
        n_forget = int(ratio / 100 * len(order))
        splits[forget_config(ratio)] = sorted(order[:n_forget])
        splits[retain_config(ratio)] = sorted(order[n_forget:])
    return splits


def synthesize(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_people: int = 200,
    num_celebrities: int = 40,
    image_size: int = 64,
    *,
    num_test_images: int = 3,
    num_base_portraits: int = 300,
    num_base_poses: int = 2,
    num_holdout: int = 0,
    fact_values: str = "shared",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic MLLMU-Bench (plus our Base_Set and, with `num_holdout` > 0, Holdout_Set) under
    `out_dir`; returns its path.

    `num_test_images` new images per person in Test_Set, `num_base_poses` extra poses per celebrity
    in Base_Set, `num_base_portraits` captioned strangers, `num_holdout` fictitious people no stage trains
    on (drawn after everyone else, so every other config is the same with or without them), `fact_values`
    "shared" (small pools, each value held by several people) or "unique" (no two people share any fact's
    value; see `people.FACT_VALUE_MODES`). Existing
    parquet files of these configs are only replaced with `overwrite=True`. Also writes
    `synthetic_info.json` (see `read_info`).
    """
    from tqdm.auto import tqdm

    _check_arguments(num_people, num_celebrities, image_size, num_test_images, num_base_portraits, num_base_poses,
                     num_holdout, fact_values)
    out = Path(out_dir)
    _clear(out, overwrite)
    width = max(3, len(str(num_people)))
    ids = [f"{i:0{width}d}" for i in range(1, num_people + 1)]
    celeb_ids = [f"C{i:03d}" for i in range(1, num_celebrities + 1)]
    known = num_people + num_celebrities
    # holdout names and looks come last: the draws are sequential, so everyone else's stay the same
    all_names = _names(_stream(seed, "names"), known + num_holdout)
    all_looks = _distinct_looks(_stream(seed, "looks"), known + num_holdout)
    holdout_ids = [f"H{i:03d}" for i in range(1, num_holdout + 1)]
    if fact_values == "shared":
        train_pools = eval_pools = FACT_POOLS
        rng_facts = _stream(seed, "facts")
        people = _people(rng_facts, all_looks[:num_people], all_names[:num_people], ids)
        celebs = _people(rng_facts, all_looks[num_people:known], all_names[num_people:known], celeb_ids)
        holdout = _people(_stream(seed, "holdout-facts"), all_looks[known:], all_names[known:], holdout_ids)
    else:
        unique = unique_fact_values(_stream(seed, "unique-facts"), known + num_holdout)
        train_pools, eval_pools, values = unique.training, unique.evaluation, unique.people
        people = _people_with(values, 0, all_looks[:num_people], all_names[:num_people], ids)
        celebs = _people_with(values, num_people, all_looks[num_people:known], all_names[num_people:known], celeb_ids)
        holdout = _people_with(values, known, all_looks[known:], all_names[known:], holdout_ids)

    bar = tqdm(total=num_people + num_celebrities + num_base_portraits, desc="synthetic benchmark",
               unit="portrait", disable=not progress)
    full, ft, test = _fictitious_rows(people, seed, image_size, num_test_images, eval_pools, bar)
    real, celeb_images = _celebrity_rows(celebs, seed, image_size, eval_pools)
    base = _base_set(celebs, celeb_images, all_looks[:known], seed, image_size, num_base_portraits, num_base_poses,
                     train_pools, bar)
    bar.close()
    splits = _splits(ids, seed)

    by_id = {r["ID"]: r for r in full}
    split_cols = list(config_features(forget_config(SPLIT_RATIOS[0])))  # retain_N has the same columns
    _write(out, FULL_SET, full, config_features(FULL_SET))
    _write(out, FT_DATA, ft, config_features(FT_DATA))
    _write(out, TEST_SET, test, config_features(TEST_SET))
    _write(out, RETAIN_SET, real, config_features(RETAIN_SET))
    _write(out, BASE_SET, base, base_set_features())
    for config, members in splits.items():
        rows = [{c: by_id[pid][c] for c in split_cols} for pid in members]
        _write(out, config, rows, config_features(config))
    held = _holdout_rows(holdout, [p.name for p in people + holdout], seed, image_size, eval_pools) if holdout else []
    if held:
        _write(out, HOLDOUT_SET, held, holdout_features())

    info = {
        "generator": "vleraser_jax.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "num_people": num_people,
        "num_celebrities": num_celebrities,
        "image_size": image_size,
        "num_test_images": num_test_images,
        "num_base_portraits": num_base_portraits,
        "num_base_poses": num_base_poses,
        "num_holdout": num_holdout,
        "fact_values": fact_values,
        **({"fact_pools": {"training": {k: list(v) for k, v in train_pools.items()},
                           "evaluation": {k: list(v) for k, v in eval_pools.items()}}}
           if fact_values != "shared" else {}),
        "rows": {FULL_SET: len(full), FT_DATA: len(ft), TEST_SET: len(test), RETAIN_SET: len(real),
                 BASE_SET: len(base), **({HOLDOUT_SET: len(held)} if held else {}),
                 **{c: len(m) for c, m in splits.items()}},
        "training_pairs": {"ft_Data": sum(len(_training_pairs(p)) for p in people)},
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def _base_set(celebs: list[Person], celeb_images: dict[str, bytes], taken: list[Look], seed: int, size: int,
              num_portraits: int, num_poses: int, pools, bar: Any) -> list[dict[str, Any]]:
    """Rows of our Base_Set: celebrity facts in every format, and captioned random portraits."""
    rng = _stream(seed, "base")
    deal = _LetterDealer(rng)
    names = [p.name for p in celebs]
    rows: list[dict[str, Any]] = []

    def add(image: bytes | None, pid: str, kind: str, q: str, a: str) -> None:
        rows.append({"image": _image(image), "ID": pid, "kind": kind, "question": q, "answer": a})

    for p in celebs:
        shots = [celeb_images[p.person_id]] + [
            _png(render_portrait(_new_scene(p.look, rng), size, _random_pose(rng))) for _ in range(num_poses)]
        poses = itertools.cycle(shots)

        def shot() -> bytes:
            return next(poses)

        for variant in (TRAIN, EVAL, TEST):
            add(shot(), p.person_id, "qa", question("Name", VISUAL_SUBJECT, variant),
                answer_sentence("Name", p.name, VISUAL_SUBJECT))
            for k in FACT_KEYS:
                for visual in (True, False):
                    subj = _subject(p, visual)
                    add(shot() if visual else None, p.person_id, "qa", question(k, subj, variant),
                        answer_sentence(k, p.value(k), subj))
        for variant in (TRAIN, EVAL, TEST):  # classification in the training wording only
            kinds = TASK_KINDS if variant == TRAIN else ("generation", "cloze")
            for kind, visual, q, a in task_rows(p, names, rng, deal, kinds=kinds, variant=variant, pools=pools):
                add(shot() if visual else None, p.person_id, kind, q, a)
        bar.update()

    people_codes = {look.visible() for look in taken}
    made = 0
    while made < num_portraits:
        look = _random_look(rng)
        if look.visible() in people_codes:  # a stranger must not be a double of anyone in the benchmark
            continue
        made += 1
        pid = f"P{made:04d}"
        img = _png(render_portrait(look, size, _random_pose(rng)))
        add(img, pid, "caption", rng.choice(_CAPTION_QUESTIONS), describe_look(look))
        fields = [(f, q) for f, q in _ATTRIBUTE_QUESTIONS if _attribute_answer(look, f) is not None]
        for field, q in rng.sample(fields, 2):
            add(img, pid, "attribute", q, _attribute_answer(look, field))
        bar.update()
    return rows


# ----------------------------------------------------------------------------- reading


def read_info(root: str | os.PathLike) -> dict[str, Any]:
    """The parameters and row counts `synthesize` recorded in `synthetic_info.json`."""
    path = Path(root) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} was not written by synthesize()")
    return json.loads(path.read_text())


def fact_values_of(info: dict[str, Any]) -> str:
    """The `fact_values` mode recorded in a `read_info` dict; benchmarks written before the field are "shared"."""
    return info.get("fact_values", "shared")


def fact_pools(root: str | os.PathLike, purpose: str = "training") -> dict[str, tuple[str, ...]]:
    """{fact: the values multiple-choice distractors are drawn from} of the benchmark at `root`, for "training"
    rows or "evaluation" items (the same pools unless its facts are unique)."""
    if purpose not in ("training", "evaluation"):
        raise ValueError(f"purpose={purpose!r}; expected 'training' or 'evaluation'")
    info = read_info(root)
    if fact_values_of(info) == "shared":
        return dict(FACT_POOLS)
    return {k: tuple(v) for k, v in info["fact_pools"][purpose].items()}


def load_base_set(
    root: str | os.PathLike,
    kinds: Iterable[str] | None = None,
    *,
    verify_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[TrainingRow, ...]:
    """Base_Set rows as TrainingRows (image None for text-only rows), optionally only some `kinds`."""
    wanted = None if kinds is None else tuple(kinds)
    if wanted is not None and any(k not in BASE_KINDS for k in wanted):
        raise ValueError(f"kinds={list(wanted)}; expected a subset of {BASE_KINDS}")
    columns, rows = mllmu.read_config(root, BASE_SET, cache_dir=cache_dir)
    mllmu._require(BASE_SET, columns, ["image", "ID", "kind", "question", "answer"])
    out = []
    for i, row in rows:
        where = mllmu._Where(BASE_SET, i, row.get("ID"))
        kind = row["kind"]
        if kind not in BASE_KINDS:
            raise where.error("kind", f"{kind!r} is not one of {BASE_KINDS}")
        if wanted is not None and kind not in wanted:
            continue
        q = mllmu._text(row, "question", where, "question")
        a = mllmu._text(row, "answer", where, "answer")
        image = None if row["image"] is None else mllmu._image_bytes(row["image"], where, "image", verify_images)
        out.append(TrainingRow(str(row["ID"]), q, a, image))
    return tuple(out)
