"""MLLMU-Bench: typed records and the loader of a local copy (parquet `train` split per config).

The synthetic benchmark (`synthetic.py`) writes the same layout, so this one loader serves both.

Layout: one folder per config under `root`, holding the parquet files of its `train` split, either
directly (`forget_5/train-00000-of-00001.parquet`, the dataset repo's layout) or in a `train/` subfolder
(`forget_5/train/0000.parquet`, the Hub's parquet-converter layout, which older revisions of MLLMU-Bench
use). Several files, as a sharded Test_Set has, are read as one split. Nothing is downloaded: files are
read with `datasets.Dataset.from_parquet`.

Schema (from the dataset card's `dataset_info` and the reference code, YokeYao/MLLMU-Bench
`eval.py` / `data_process/data_preprocess.py`, franciscoliu/oct_arr_mllmu_bench `data/data_split.py`):

- Full_Set, Retain_Set: `image` (Image: struct{bytes, path}), `ID`, `Directory`, `biography` (JSON
  string with `Name`, ...), `question`, `answer`, `Classification_Task` struct{Image_Textual_Questions,
  Pure_Text_Questions: list of {Correct_Answer, Options{A,B,C,D}, Question}}, `Generation_Task` and
  `Mask_Task`: list of {Ground_Truth, Question, Type}. forget_N / retain_(100-N): the same without
  `Directory`. ft_Data: `image`, `ID`, `metadata` (JSON list of {Question, Answer, ID}).
- Test_Set: the card does not list it; eval.py reads `row["images"]` (a list of Image structs) and the
  task columns. Assumed here: Full_Set's columns with `images` instead of `image` and no `Directory`;
  `biography` is optional (the forget profile's is used otherwise); a Test_Set with `image` only is
  read too, as eval.py falls back to it.

Choices, where the reference leaves room:

- Test images: `Profile.image` is the first of `images`, the rest go to `extra_images`. eval.py draws
  one with `random.choice` per row, unseeded; a fixed first image makes runs repeatable, and an
  evaluator can still average over `(image, *extra_images)`.
- Training rows: forget_train / retain_train are the ft_Data rows (`metadata`) of the forget / retain
  IDs, in the order of those configs; full_train is all of ft_Data. Like finetune.py, every
  metadata pair is trained with the row's image. Text-only rows are an extension of ours: an entry
  with `"Type": "Pure_Text"` gets `image=None` (`"Image_Textual"` or no `Type` keeps the image).
  Entries without a non-empty Question and Answer (data_split.py's `Additional_*` entries) are
  skipped, as the reference dataset class does.
- `Correct_Answer` is compared after stripping whitespace; `Options` must be exactly A, B, C, D
  (eval.py's few-shot prompt indexes all four). `Type` must be "Image_Textual" or "Pure_Text".
- Errors: a missing folder raises FileNotFoundError, anything else `BenchmarkFormatError` (a
  ValueError); messages name the config, column, ID and row. Refused rather than silently skipped: an
  empty forget or retain set, forget/retain overlap, a person with no items in a task column, a forget or
  retain person without training QA pairs, a forget ratio the copy does not have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

FORGET_RATIOS = (5, 10, 15)
EVAL_SETS = ("forget", "test", "retain", "real")
MODES = ("visual", "textual")  # Visual-QA: image + question about "the person in the image"; Textual-QA: name in text, no image

FULL_SET = "Full_Set"
FT_DATA = "ft_Data"
TEST_SET = "Test_Set"
RETAIN_SET = "Retain_Set"  # real celebrities
OPTION_LETTERS = ("A", "B", "C", "D")
ITEM_TYPES = ("Image_Textual", "Pure_Text")

# MLLMU-Bench eval.py task instructions (appended to the question on its own line).
MC_INSTRUCTION = "Just give ONE letter representing the answer directly."
GEN_INSTRUCTION_VISUAL = "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH."
GEN_INSTRUCTION_TEXTUAL = "Answer the question based on your trained knowledge in one sentence in ENGLISH."
CLOZE_INSTRUCTION = "Please **ONLY** provide the correct answer that should replace the [Blank]."


class BenchmarkFormatError(ValueError):
    """A config breaks the MLLMU-Bench schema (or lacks what a request needs); the message names config,
    column and ID."""


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    question: str
    options: dict[str, str]  # {"A": ..., "B": ..., "C": ..., "D": ...}, in that order
    answer: str  # the correct option letter


@dataclasses.dataclass(frozen=True)
class OpenItem:
    """A generation (free answer) or cloze (fill the `__`) item; `type` is MLLMU's "Type" field."""

    question: str
    ground_truth: str
    type: str  # "Image_Textual" (asked with the image) or "Pure_Text" (asked with the name, no image)

    @property
    def mode(self) -> str:
        return "visual" if self.type.lower().startswith("image") else "textual"


@dataclasses.dataclass(frozen=True)
class Profile:
    """One person of an evaluation set, with every task item MLLMU-Bench asks about them."""

    person_id: str
    name: str
    image: bytes  # encoded image (PNG/JPEG bytes); for Test_Set one of `images`, the others kept below
    biography: dict[str, Any]
    visual_mc: tuple[MultipleChoice, ...]  # Classification_Task.Image_Textual_Questions
    textual_mc: tuple[MultipleChoice, ...]  # Classification_Task.Pure_Text_Questions
    generation: tuple[OpenItem, ...]  # Generation_Task
    cloze: tuple[OpenItem, ...]  # Mask_Task
    extra_images: tuple[bytes, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainingRow:
    """One fine-tuning / unlearning QA pair (from `metadata`); `image` None means a text-only row."""

    person_id: str
    question: str
    answer: str
    image: bytes | None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A forget split of MLLMU-Bench (or the synthetic one): four evaluation sets and the training rows."""

    root: str
    forget_ratio: int
    forget: tuple[Profile, ...]
    test: tuple[Profile, ...]  # the forget people in new images
    retain: tuple[Profile, ...]
    real: tuple[Profile, ...]  # real celebrities (Retain_Set)
    forget_train: tuple[TrainingRow, ...]
    retain_train: tuple[TrainingRow, ...]
    full_train: tuple[TrainingRow, ...]  # ft_Data: every fictitious person (the "vanilla" fine-tune)

    def eval_set(self, name: str) -> tuple[Profile, ...]:
        if name not in EVAL_SETS:
            raise KeyError(f"unknown evaluation set {name!r}; expected one of {EVAL_SETS}")
        return getattr(self, name)


# ----------------------------------------------------------------------------- schema


def forget_config(ratio: int) -> str:
    return f"forget_{ratio}"


def retain_config(ratio: int) -> str:
    """The retain config paired with forget_`ratio` (retain_95 for 5)."""
    return f"retain_{100 - ratio}"


def config_features(config: str):
    """The `datasets.Features` of an MLLMU-Bench config, column order as on the dataset card.

    Struct fields are in the card's (alphabetical) order, so files written with these features have
    the same arrow schema as the published ones.
    """
    from datasets import Features, Image, List, Value

    s = Value("string")
    mc = List({"Correct_Answer": s, "Options": {k: s for k in OPTION_LETTERS}, "Question": s})
    open_items = List({"Ground_Truth": s, "Question": s, "Type": s})
    tasks = {
        "Classification_Task": {"Image_Textual_Questions": mc, "Pure_Text_Questions": mc},
        "Generation_Task": open_items,
        "Mask_Task": open_items,
    }
    if config == FT_DATA:
        return Features({"image": Image(), "ID": s, "metadata": s})
    if config in (FULL_SET, RETAIN_SET):
        head = {"image": Image(), "ID": s, "Directory": s}
    elif config == TEST_SET:
        head = {"images": List(Image()), "ID": s}
    elif re.fullmatch(r"(forget|retain)_\d+", config):
        head = {"image": Image(), "ID": s}
    else:
        raise KeyError(f"{config!r} is not an MLLMU-Bench config")
    return Features({**head, "biography": s, "question": s, "answer": s, **tasks})


# ----------------------------------------------------------------------------- discovery


def _parquet_files(folder: Path) -> list[Path]:
    """The `train` split's files of a config folder: `train*.parquet` in it, else `train/*.parquet`
    (parquet-converter), else every parquet file in it; [] when it holds none."""
    files = sorted(folder.glob("*.parquet"))
    train = [f for f in files if f.name.startswith("train")]
    nested = sorted((folder / "train").glob("*.parquet"))
    if train and nested:
        raise BenchmarkFormatError(f"{folder}: holds the train split twice ({train[0].name} and "
                                   f"train/{nested[0].name}); keep one layout")
    return train or nested or files


def config_files(root: str | os.PathLike, config: str, needed_for: str = "") -> list[Path]:
    """The parquet files of `config` under `root`. A missing folder raises FileNotFoundError, a folder without
    parquet files BenchmarkFormatError; both name the folder."""
    folder = Path(root) / config
    why = f" (needed for {needed_for})" if needed_for else ""
    if not folder.is_dir():
        raise FileNotFoundError(f"{Path(root)}: missing config folder {config!r}{why}")
    files = _parquet_files(folder)
    if not files:
        raise BenchmarkFormatError(f"{folder}: the config folder holds no parquet files{why} (looked for "
                                   f"{config}/*.parquet and {config}/train/*.parquet)")
    return files


def list_configs(root: str | os.PathLike) -> tuple[str, ...]:
    """Names of the config folders under `root` that hold parquet files, sorted."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"benchmark root {base} does not exist")
    return tuple(sorted(d.name for d in base.iterdir() if d.is_dir() and _parquet_files(d)))


def available_forget_ratios(root: str | os.PathLike) -> tuple[int, ...]:
    """Forget ratios N with a forget_N config under `root`, ascending."""
    ratios = []
    for name in list_configs(root):
        m = re.fullmatch(r"forget_(\d+)", name)
        if m:
            ratios.append(int(m.group(1)))
    return tuple(sorted(ratios))


# ----------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' "Generating train split" bars for one read, restoring the user's setting."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def read_config(
    root: str | os.PathLike,
    config: str,
    *,
    ids: Iterable[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Column names and `(row index, row)` pairs of a config, as plain Python values.

    Image columns stay raw `{"bytes", "path"}` dicts (never decoded). With `ids`, only rows whose
    `ID` is among them are converted, so a large Test_Set is not copied whole into Python.
    """
    from datasets import Dataset

    files = config_files(root, config)
    import pyarrow.parquet as pq

    try:
        metas = [pq.ParquetFile(f).metadata for f in files]
        if not sum(m.num_rows for m in metas):  # datasets cannot build a split from zero-row files
            return list(metas[0].schema.to_arrow_schema().names), []
        with _quiet_datasets():
            ds = Dataset.from_parquet([str(f) for f in files], cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:  # corrupt file, mismatched shards: name the config and the root cause
        cause = e.__cause__ or e
        names = [str(f.relative_to(Path(root) / config)) for f in files]
        raise BenchmarkFormatError(f"{config}: cannot read {names}: {cause}") from e
    table = ds.with_format("arrow")
    if ids is None:
        index = list(range(len(ds)))
    else:
        if "ID" not in ds.column_names:
            raise BenchmarkFormatError(f"{config}: missing column 'ID' (columns: {ds.column_names})")
        wanted = set(ids)
        index = [i for i, x in enumerate(table[:]["ID"].to_pylist()) if x in wanted]
    rows = table[index].to_pylist() if index else []
    return list(ds.column_names), list(zip(index, rows))


def _require(config: str, columns: list[str], required: Iterable[str]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise BenchmarkFormatError(f"{config}: missing column(s) {missing} (columns: {columns})")


class _Where:
    """Error context of one row: `config: column 'c', ID '001' (row 3): ...`."""

    def __init__(self, config: str, row: int, pid: Any):
        self.config, self.row, self.pid = config, row, pid

    def error(self, column: str, msg: str) -> BenchmarkFormatError:
        return BenchmarkFormatError(f"{self.config}: column {column!r}, ID {self.pid!r} (row {self.row}): {msg}")


def _image_bytes(value: Any, where: _Where, column: str, verify: bool) -> bytes:
    """The encoded bytes of an Image struct; with `verify`, PIL must be able to read them."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        path = value.get("path") if isinstance(value, dict) else None
        raise where.error(column, f"no embedded image bytes (path={path!r})")
    data = bytes(data)
    if verify:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception as e:
            raise where.error(column, f"image bytes cannot be decoded ({type(e).__name__}: {e})") from None
    return data


def _json(value: Any, where: _Where, column: str) -> Any:
    if not isinstance(value, str):
        raise where.error(column, f"expected a JSON string, got {type(value).__name__}")
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise where.error(column, f"not valid JSON ({e})") from None


def _biography(value: Any, where: _Where) -> dict[str, Any]:
    bio = _json(value, where, "biography")
    if not isinstance(bio, dict):
        raise where.error("biography", f"expected a JSON object, got {type(bio).__name__}")
    name = bio.get("Name")
    if not isinstance(name, str) or not name.strip():
        raise where.error("biography", f"no 'Name' (keys: {sorted(bio)})")
    return bio


def _text(item: dict[str, Any], key: str, where: _Where, column: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise where.error(column, f"{key!r} must be a string, got {value!r}")
    return value


def _multiple_choice(items: Any, where: _Where, column: str) -> tuple[MultipleChoice, ...]:
    if not isinstance(items, list):
        raise where.error(column, f"expected a list of questions, got {items!r}")
    out = []
    for j, item in enumerate(items):
        col = f"{column}[{j}]"
        if not isinstance(item, dict):
            raise where.error(col, f"expected a question struct, got {item!r}")
        question = _text(item, "Question", where, col)
        options = item.get("Options")
        if not isinstance(options, dict):
            raise where.error(col, f"'Options' must be a struct A-D, got {options!r}")
        letters = tuple(options)
        if sorted(letters) != list(OPTION_LETTERS):
            raise where.error(col, f"option letters {list(letters)} are not A-D")
        for k in OPTION_LETTERS:
            if not isinstance(options[k], str) or not options[k].strip():
                raise where.error(col, f"option {k} is empty ({options[k]!r})")
        answer = _text(item, "Correct_Answer", where, col).strip()
        if answer not in OPTION_LETTERS:
            raise where.error(col, f"correct answer {answer!r} is not an option (A-D)")
        out.append(MultipleChoice(question, {k: options[k] for k in OPTION_LETTERS}, answer))
    return tuple(out)


def _open_items(items: Any, where: _Where, column: str) -> tuple[OpenItem, ...]:
    if not isinstance(items, list):
        raise where.error(column, f"expected a list of items, got {items!r}")
    out = []
    for j, item in enumerate(items):
        col = f"{column}[{j}]"
        if not isinstance(item, dict):
            raise where.error(col, f"expected an item struct, got {item!r}")
        kind = _text(item, "Type", where, col)
        if kind not in ITEM_TYPES:
            raise where.error(col, f"Type {kind!r} is not one of {ITEM_TYPES}")
        out.append(OpenItem(_text(item, "Question", where, col), _text(item, "Ground_Truth", where, col), kind))
    return tuple(out)


def _classification(value: Any, where: _Where) -> tuple[tuple[MultipleChoice, ...], tuple[MultipleChoice, ...]]:
    if not isinstance(value, dict):
        raise where.error("Classification_Task", f"expected a struct, got {value!r}")
    col = "Classification_Task.{}"
    return (
        _multiple_choice(value.get("Image_Textual_Questions"), where, col.format("Image_Textual_Questions")),
        _multiple_choice(value.get("Pure_Text_Questions"), where, col.format("Pure_Text_Questions")),
    )


_TASK_COLUMNS = ("Classification_Task", "Generation_Task", "Mask_Task")


def _check_ids(config: str, rows: list[tuple[int, dict[str, Any]]]) -> None:
    """Every row has a non-empty string ID, and no ID repeats."""
    seen: set[str] = set()
    for i, row in rows:
        pid = row.get("ID")
        if not isinstance(pid, str) or not pid:
            raise _Where(config, i, pid).error("ID", f"expected a non-empty string, got {pid!r}")
        if pid in seen:
            raise _Where(config, i, pid).error("ID", "duplicate ID")
        seen.add(pid)


def load_profiles(
    root: str | os.PathLike,
    config: str,
    *,
    ids: Iterable[str] | None = None,
    fallback: dict[str, Profile] | None = None,
    verify_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Profile, ...]:
    """Every row of an evaluation config (forget_N, retain_N, Full_Set, Retain_Set, Test_Set) as a Profile.

    A config with `images` (Test_Set) gives the first as `image` and the rest as `extra_images`.
    `ids` keeps only those people; `fallback` (ID -> Profile) supplies name and biography when the
    config has no `biography` column.
    """
    columns, rows = read_config(root, config, ids=ids, cache_dir=cache_dir)
    image_col = "images" if "images" in columns else "image"
    need_bio = not fallback or "biography" in columns
    _require(config, columns, ["ID", image_col, *(["biography"] if need_bio else []), *_TASK_COLUMNS])
    _check_ids(config, rows)
    out = []
    for i, row in rows:
        pid = row["ID"]
        where = _Where(config, i, pid)
        if image_col == "images":
            imgs = row["images"]
            if not isinstance(imgs, list) or not imgs:
                raise where.error("images", f"expected a non-empty list of images, got {imgs!r}")
            encoded = [_image_bytes(v, where, f"images[{j}]", verify_images) for j, v in enumerate(imgs)]
        else:
            encoded = [_image_bytes(row["image"], where, "image", verify_images)]
        if "biography" in columns:
            bio = _biography(row["biography"], where)
        elif fallback and pid in fallback:
            bio = fallback[pid].biography
        else:
            raise where.error("biography", "column absent and no other config gives this person's biography")
        visual_mc, textual_mc = _classification(row["Classification_Task"], where)
        generation = _open_items(row["Generation_Task"], where, "Generation_Task")
        cloze = _open_items(row["Mask_Task"], where, "Mask_Task")
        for column, items in (("Classification_Task", visual_mc + textual_mc), ("Generation_Task", generation),
                              ("Mask_Task", cloze)):
            if not items:  # the person would silently drop out of that task's scores
                raise where.error(column, "no task items for this person")
        out.append(
            Profile(
                person_id=pid,
                name=bio["Name"],
                image=encoded[0],
                biography=bio,
                visual_mc=visual_mc,
                textual_mc=textual_mc,
                generation=generation,
                cloze=cloze,
                extra_images=tuple(encoded[1:]),
            )
        )
    return tuple(out)


def _metadata_rows(value: Any, image: bytes, pid: str, where: _Where) -> list[TrainingRow]:
    entries = _json(value, where, "metadata")
    if not isinstance(entries, list):
        raise where.error("metadata", f"expected a JSON list of QA objects, got {type(entries).__name__}")
    out = []
    for j, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise where.error(f"metadata[{j}]", f"expected a JSON object, got {entry!r}")
        question, answer = entry.get("Question"), entry.get("Answer")
        if not (isinstance(question, str) and question.strip() and isinstance(answer, str) and answer.strip()):
            continue  # e.g. data_split.py's Additional_* entries; the reference dataset skips them too
        kind = entry.get("Type", "Image_Textual")
        if kind not in ITEM_TYPES:
            raise where.error(f"metadata[{j}]", f"Type {kind!r} is not one of {ITEM_TYPES}")
        out.append(TrainingRow(pid, question, answer, image if kind == "Image_Textual" else None))
    return out


def load_training_rows(
    root: str | os.PathLike,
    config: str = FT_DATA,
    *,
    ids: Iterable[str] | None = None,
    verify_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, tuple[TrainingRow, ...]]:
    """The QA pairs of a training config (ft_Data: `image`, `ID`, `metadata`), per person ID, in file order."""
    columns, rows = read_config(root, config, ids=ids, cache_dir=cache_dir)
    _require(config, columns, ["ID", "image", "metadata"])
    _check_ids(config, rows)
    out: dict[str, tuple[TrainingRow, ...]] = {}
    for i, row in rows:
        where = _Where(config, i, row["ID"])
        image = _image_bytes(row["image"], where, "image", verify_images)
        out[row["ID"]] = tuple(_metadata_rows(row["metadata"], image, row["ID"], where))
    return out


# ----------------------------------------------------------------------------- benchmark


def load_benchmark(
    root: str | os.PathLike,
    forget_ratio: int = 5,
    *,
    verify_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Benchmark:
    """Load the forget_`forget_ratio` split of a local MLLMU-Bench (or synthetic) copy.

    Reads forget_N, retain_(100-N), Test_Set (rows of the forget IDs), Retain_Set and ft_Data.
    `verify_images` checks every image decodes (PIL `verify`); `cache_dir` is passed to datasets.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"benchmark root {base} does not exist")
    if isinstance(forget_ratio, bool) or not isinstance(forget_ratio, int) or not 0 < forget_ratio < 100:
        raise BenchmarkFormatError(f"forget_ratio={forget_ratio!r}; expected an integer percentage in 1..99")
    ratios = available_forget_ratios(base)
    if forget_ratio not in ratios:
        if (base / forget_config(forget_ratio)).is_dir():  # there, but without parquet files: say so
            config_files(base, forget_config(forget_ratio), f"forget ratio {forget_ratio}")
        raise BenchmarkFormatError(
            f"forget ratio {forget_ratio} is not available under {base}: no {forget_config(forget_ratio)} "
            f"config (available ratios: {list(ratios)})"
        )
    f_cfg, r_cfg = forget_config(forget_ratio), retain_config(forget_ratio)
    for cfg in (r_cfg, TEST_SET, RETAIN_SET, FT_DATA):  # fail before reading anything large
        config_files(base, cfg, f"forget ratio {forget_ratio}")
    kw = dict(verify_images=verify_images, cache_dir=cache_dir)

    forget = load_profiles(base, f_cfg, **kw)
    if not forget:
        raise BenchmarkFormatError(f"{f_cfg}: empty forget set (no rows)")
    retain = load_profiles(base, r_cfg, **kw)
    if not retain:
        raise BenchmarkFormatError(f"{r_cfg}: empty retain set (no rows)")
    forget_ids = [p.person_id for p in forget]
    retain_ids = {p.person_id for p in retain}
    overlap = [pid for pid in forget_ids if pid in retain_ids]
    if overlap:
        raise BenchmarkFormatError(f"{f_cfg} / {r_cfg}: column 'ID': forget and retain sets overlap on IDs {overlap}")

    by_id = {p.person_id: p for p in forget}
    test_rows = {p.person_id: p for p in load_profiles(base, TEST_SET, ids=forget_ids, fallback=by_id, **kw)}
    missing = [pid for pid in forget_ids if pid not in test_rows]
    if missing:
        raise BenchmarkFormatError(f"{TEST_SET}: column 'ID': no row for forget IDs {missing}")
    test = tuple(test_rows[pid] for pid in forget_ids)
    real = load_profiles(base, RETAIN_SET, **kw)

    train = load_training_rows(base, FT_DATA, **kw)

    def rows_of(profiles: tuple[Profile, ...], name: str) -> tuple[TrainingRow, ...]:
        absent = [p.person_id for p in profiles if p.person_id not in train]
        if absent:
            raise BenchmarkFormatError(f"{FT_DATA}: column 'ID': no training rows for {name} IDs {absent}")
        empty = [p.person_id for p in profiles if not train[p.person_id]]
        if empty:  # nothing to unlearn (forget) or to keep (retain) for them
            raise BenchmarkFormatError(f"{FT_DATA}: column 'metadata': no question/answer pairs for {name} IDs {empty}")
        return tuple(r for p in profiles for r in train[p.person_id])

    return Benchmark(
        root=str(base),
        forget_ratio=forget_ratio,
        forget=forget,
        test=test,
        retain=retain,
        real=real,
        forget_train=rows_of(forget, f_cfg),
        retain_train=rows_of(retain, r_cfg),
        full_train=tuple(r for rows in train.values() for r in rows),
    )
