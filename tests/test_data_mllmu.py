"""The MLLMU-Bench loader on a tiny fixture written here in the published schema (nothing downloaded)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vleraser_jax.data import mllmu as M

# The schema as the dataset card (MLLMMU/MLLMU-Bench README `dataset_info`) lists it, written out by
# hand so the synthetic generator's own copy (mllmu.config_features) is checked against it.
S = {"dtype": "string", "_type": "Value"}
IMAGE = {"_type": "Image"}
MC_ITEM = {"Correct_Answer": S, "Options": {"A": S, "B": S, "C": S, "D": S}, "Question": S}
OPEN_ITEM = {"Ground_Truth": S, "Question": S, "Type": S}
TASKS = {
    "Classification_Task": {
        "Image_Textual_Questions": {"feature": MC_ITEM, "_type": "List"},
        "Pure_Text_Questions": {"feature": MC_ITEM, "_type": "List"},
    },
    "Generation_Task": {"feature": OPEN_ITEM, "_type": "List"},
    "Mask_Task": {"feature": OPEN_ITEM, "_type": "List"},
}
PROFILE_TAIL = {"biography": S, "question": S, "answer": S, **TASKS}
CARD_SCHEMA = {
    "Full_Set": {"image": IMAGE, "ID": S, "Directory": S, **PROFILE_TAIL},
    "Retain_Set": {"image": IMAGE, "ID": S, "Directory": S, **PROFILE_TAIL},
    "forget_5": {"image": IMAGE, "ID": S, **PROFILE_TAIL},
    "retain_95": {"image": IMAGE, "ID": S, **PROFILE_TAIL},
    "forget_10": {"image": IMAGE, "ID": S, **PROFILE_TAIL},
    "retain_90": {"image": IMAGE, "ID": S, **PROFILE_TAIL},
    # Not on the card; eval.py reads `images` (a list of images) for it.
    "Test_Set": {"images": {"feature": IMAGE, "_type": "List"}, "ID": S, **PROFILE_TAIL},
    "ft_Data": {"image": IMAGE, "ID": S, "metadata": S},
}

@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    """datasets caches every parquet it reads; keep this module's caches out of the user's HF cache."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


PEOPLE = ["001", "002", "003", "004", "005"]
CELEBS = ["101", "102"]
SPLITS = {"forget_5": ["002"], "retain_95": ["001", "003", "004", "005"],
          "forget_10": ["001", "004"], "retain_90": ["002", "003", "005"]}


def card_features(config: str):
    from datasets import Features

    return Features.from_dict(CARD_SCHEMA[config])


def png(colour, size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _colour(pid: str, k: int = 0):
    n = int(pid)
    return (n * 37 % 256, (n * 91 + 40 * k) % 256, (17 * k + n) % 256)


def _person(pid: str) -> dict:
    name = f"Person {pid}"
    bio = {"Name": name, "Born": f"Town {pid}", "Employment": "potter"}
    mc = lambda q, ans, opts: {"Correct_Answer": ans, "Options": dict(zip("ABCD", opts)), "Question": q}  # noqa: E731
    return {
        "image": {"bytes": png(_colour(pid)), "path": None},
        "ID": pid,
        "biography": json.dumps(bio),
        "question": "Who is this?",
        "answer": f"This is {name}.",
        "Classification_Task": {
            "Image_Textual_Questions": [
                mc("What is the name of the person in the image?", "C", ["X Y", "Z W", name, "Q R"]),
                mc("Where was the person in the image born?", "A", [f"Town {pid}", "Elsewhere", "Nowhere", "There"]),
            ],
            "Pure_Text_Questions": [mc(f"What does {name} do?", "D", ["baker", "pilot", "nurse", "potter"])],
        },
        "Generation_Task": [
            {"Ground_Truth": f"The person was born in Town {pid}.", "Question": "Where was the person in the image born?",
             "Type": "Image_Textual"},
            {"Ground_Truth": f"{name} is a potter.", "Question": f"What does {name} do?", "Type": "Pure_Text"},
        ],
        "Mask_Task": [
            {"Ground_Truth": f"Town {pid}", "Question": "The person in the image was born in __.", "Type": "Image_Textual"},
            {"Ground_Truth": "potter", "Question": f"{name} works as a __.", "Type": "Pure_Text"},
        ],
    }


def _metadata(pid: str) -> str:
    qa = [{"Question": f"Q{j} about {pid}?", "Answer": f"A{j} about {pid}.", "ID": pid} for j in range(3)]
    # data_split.py appends entries of this shape; the reference dataset class skips them.
    qa.append({"Additional_ID": pid, "Additional_question": "Extra?", "Additional_answer": "Extra."})
    return json.dumps(qa)


def fixture_tables() -> dict[str, list[dict]]:
    people = {pid: _person(pid) for pid in PEOPLE}
    tables: dict[str, list[dict]] = {
        "Full_Set": [{**people[p], "Directory": f"data/{p}.png"} for p in PEOPLE],
        "Retain_Set": [{**_person(p), "Directory": f"celeb/{p}.png"} for p in CELEBS],
        "ft_Data": [{"image": people[p]["image"], "ID": p, "metadata": _metadata(p)} for p in PEOPLE],
        "Test_Set": [
            {**{k: v for k, v in people[p].items() if k != "image"},
             "images": [{"bytes": png(_colour(p, k)), "path": None} for k in (1, 2)]}
            for p in PEOPLE
        ],
    }
    for config, ids in SPLITS.items():
        tables[config] = [dict(people[p]) for p in ids]
    return tables


def write_fixture(root: Path, edit=None) -> Path:
    """Write the fixture with datasets' own parquet writer. `edit(tables, features)` may change either
    in place; a config whose features are set to None is written with pyarrow's inferred schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    tables = fixture_tables()
    features = {c: card_features(c) for c in tables}
    if edit is not None:
        edit(tables, features)
    for config, rows in tables.items():
        folder = root / config
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "train-00000-of-00001.parquet"
        feats = features[config]
        if feats is None:
            pq.write_table(pa.Table.from_pylist(rows), path)
        elif not rows:
            pq.write_table(pa.Table.from_pylist([], schema=feats.arrow_schema), path)
        else:  # columns in the card's order (from_list follows the dicts' key order)
            Dataset.from_list([{k: r[k] for k in feats} for r in rows], features=feats).to_parquet(str(path))
    return root


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("mllmu"))


def test_configs_and_ratios(fixture_root):
    assert M.list_configs(fixture_root) == tuple(sorted(CARD_SCHEMA))
    assert M.available_forget_ratios(fixture_root) == (5, 10)


def test_load_benchmark(fixture_root):
    b = M.load_benchmark(fixture_root, 5)
    assert b.forget_ratio == 5 and b.root == str(fixture_root)
    assert [p.person_id for p in b.forget] == ["002"]
    assert [p.person_id for p in b.retain] == ["001", "003", "004", "005"]
    assert [p.person_id for p in b.real] == CELEBS
    (f,) = b.forget
    assert f.name == "Person 002" and f.biography["Born"] == "Town 002"
    assert f.image == png(_colour("002")) and f.extra_images == ()
    assert [mc.answer for mc in f.visual_mc] == ["C", "A"]
    assert list(f.visual_mc[0].options) == list("ABCD") and f.visual_mc[0].options["C"] == "Person 002"
    assert f.textual_mc[0].options["D"] == "potter"
    assert [(it.type, it.mode) for it in f.generation] == [("Image_Textual", "visual"), ("Pure_Text", "textual")]
    assert f.cloze[0].ground_truth == "Town 002" and "__" in f.cloze[0].question

    (t,) = b.test  # Test_Set row of the forget person: first image, the other kept
    assert t.person_id == "002" and t.name == "Person 002"
    assert t.image == png(_colour("002", 1)) and t.extra_images == (png(_colour("002", 2)),)
    assert b.eval_set("test") is b.test

    assert [(r.person_id, r.question) for r in b.forget_train] == [("002", f"Q{j} about 002?") for j in range(3)]
    assert all(r.image == f.image for r in b.forget_train)  # finetune.py trains every pair with the image
    assert {r.person_id for r in b.retain_train} == {"001", "003", "004", "005"}
    assert len(b.retain_train) == 12 and len(b.full_train) == 15

    b10 = M.load_benchmark(fixture_root, 10)
    assert [p.person_id for p in b10.forget] == ["001", "004"] == [p.person_id for p in b10.test]


def test_text_only_training_rows_and_test_set_fallbacks(tmp_path):
    def edit(tables, features):
        meta = json.loads(tables["ft_Data"][1]["metadata"])
        meta[1]["Type"] = "Pure_Text"
        meta[2]["Type"] = "Image_Textual"
        tables["ft_Data"][1]["metadata"] = json.dumps(meta)
        # A Test_Set with a single `image` and no biography: eval.py's fallback, name from forget_5.
        for row in tables["Test_Set"]:
            row["image"] = row.pop("images")[0]
            del row["biography"]
        features["Test_Set"] = None

    b = M.load_benchmark(write_fixture(tmp_path, edit), 5)
    assert [r.image is None for r in b.forget_train] == [False, True, False]
    (t,) = b.test
    assert t.name == "Person 002" and t.image == png(_colour("002", 1)) and t.extra_images == ()


def _set(config, pid, key, value):
    def edit(tables, features):
        for row in tables[config]:
            if row["ID"] == pid:
                row[key] = value
    return edit


def _mc_edit(config, pid, fn):
    """Change every visual question of one person (so pyarrow infers one Options struct for them)."""
    def edit(tables, features):
        for row in tables[config]:
            if row["ID"] == pid:
                for item in row["Classification_Task"]["Image_Textual_Questions"]:
                    fn(item)
        features[config] = None
    return edit


def _drop_column(config, column):
    def edit(tables, features):
        for row in tables[config]:
            del row[column]
        features[config] = None
    return edit


def _other_letters(item):
    opts = item["Options"]
    item["Options"] = {"A": opts["A"], "B": opts["B"], "C": opts["C"], "E": opts["D"]}


def _add_retain_overlap(tables, features):
    tables["retain_95"].append(dict(tables["forget_5"][0]))


def _empty_forget(tables, features):
    tables["forget_5"] = []


def _duplicate_celebrity(tables, features):
    tables["Retain_Set"].append(dict(tables["Retain_Set"][0]))


def _remove(config):
    def edit(tables, features):
        del tables[config]
    return edit


def _missing_image(config, pid):
    """An image struct that only names a file (not embedded), written as-is (datasets would try to embed it)."""
    def edit(tables, features):
        _set(config, pid, "image", {"bytes": None, "path": "data/003.png"})(tables, features)
        features[config] = None
    return edit


def _empty_retain(tables, features):
    tables["retain_95"] = []


def _no_qa_pairs(pid):
    """ft_Data keeps the person, but only with entries the loader skips (data_split.py's Additional_*)."""
    def edit(tables, features):
        for row in tables["ft_Data"]:
            if row["ID"] == pid:
                row["metadata"] = json.dumps([{"Additional_ID": pid, "Additional_question": "Q?",
                                               "Additional_answer": "A."}])
    return edit


def _no_classification(tables, features):
    for row in tables["forget_5"]:
        row["Classification_Task"] = {"Image_Textual_Questions": [], "Pure_Text_Questions": []}


ERRORS = {
    "missing config folder": (_remove("Test_Set"), 5, FileNotFoundError, ["missing config folder 'Test_Set'"]),
    "missing column": (_drop_column("retain_95", "Mask_Task"), 5, M.BenchmarkFormatError,
                       ["retain_95: missing column(s) ['Mask_Task']"]),
    "undecodable image": (_set("forget_5", "002", "image", {"bytes": b"not a png", "path": None}), 5,
                          M.BenchmarkFormatError, ["forget_5: column 'image', ID '002'", "cannot be decoded"]),
    "undecodable test image": (_set("Test_Set", "002", "images", [{"bytes": png((1, 2, 3)), "path": None},
                                                                  {"bytes": b"\x89PNG broken", "path": None}]),
                               5, M.BenchmarkFormatError, ["Test_Set: column 'images[1]', ID '002'"]),
    "bad biography JSON": (_set("retain_95", "003", "biography", "{'Name': 'Person 003'"), 5,
                           M.BenchmarkFormatError, ["retain_95: column 'biography', ID '003'", "not valid JSON"]),
    "biography without Name": (_set("Retain_Set", "101", "biography", json.dumps({"Born": "x"})), 5,
                               M.BenchmarkFormatError, ["Retain_Set: column 'biography', ID '101'", "'Name'"]),
    "bad metadata JSON": (_set("ft_Data", "004", "metadata", "[{\"Question\": \"Q?\""), 5, M.BenchmarkFormatError,
                          ["ft_Data: column 'metadata', ID '004'", "not valid JSON"]),
    "option letters": (_mc_edit("forget_5", "002", _other_letters), 5, M.BenchmarkFormatError,
                       ["forget_5: column 'Classification_Task.Image_Textual_Questions[0]', ID '002'",
                        "option letters ['A', 'B', 'C', 'E'] are not A-D"]),
    "answer not an option": (_mc_edit("forget_5", "002", lambda it: it.update(Correct_Answer="E")), 5,
                             M.BenchmarkFormatError,
                             ["forget_5: column 'Classification_Task.Image_Textual_Questions[0]', ID '002'",
                              "correct answer 'E' is not an option"]),
    "bad item type": (_set("retain_95", "005", "Mask_Task", [{"Ground_Truth": "x", "Question": "__", "Type": "Video"}]),
                      5, M.BenchmarkFormatError, ["retain_95: column 'Mask_Task[0]', ID '005'", "'Video'"]),
    "empty forget set": (_empty_forget, 5, M.BenchmarkFormatError, ["forget_5: empty forget set"]),
    "forget/retain overlap": (_add_retain_overlap, 5, M.BenchmarkFormatError,
                              ["forget_5 / retain_95", "overlap on IDs ['002']"]),
    "duplicate ID": (_duplicate_celebrity, 5, M.BenchmarkFormatError,
                     ["Retain_Set: column 'ID', ID '101' (row 2): duplicate ID"]),
    "unavailable ratio": (None, 15, M.BenchmarkFormatError, ["forget ratio 15 is not available", "no forget_15 config",
                                                           "available ratios: [5, 10]"]),
    "missing image": (_missing_image("retain_95", "003"), 5, M.BenchmarkFormatError,
                      ["retain_95: column 'image', ID '003'", "no embedded image bytes (path='data/003.png')"]),
    "empty retain set": (_empty_retain, 5, M.BenchmarkFormatError, ["retain_95: empty retain set"]),
    "person without cloze items": (_set("forget_5", "002", "Mask_Task", []), 5, M.BenchmarkFormatError,
                                   ["forget_5: column 'Mask_Task', ID '002'", "no task items"]),
    "person without generation items": (_set("Retain_Set", "102", "Generation_Task", []), 5, M.BenchmarkFormatError,
                                        ["Retain_Set: column 'Generation_Task', ID '102'", "no task items"]),
    "person without classification items": (_no_classification, 5, M.BenchmarkFormatError,
                                            ["forget_5: column 'Classification_Task', ID '002'", "no task items"]),
    "forget person without QA pairs": (_no_qa_pairs("002"), 5, M.BenchmarkFormatError,
                                       ["ft_Data: column 'metadata'", "for forget_5 IDs ['002']"]),
    "retain person without QA pairs": (_no_qa_pairs("004"), 5, M.BenchmarkFormatError,
                                       ["ft_Data: column 'metadata'", "for retain_95 IDs ['004']"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_validation_errors(tmp_path, case):
    edit, ratio, exc, fragments = ERRORS[case]
    root = write_fixture(tmp_path, edit)
    with pytest.raises(exc) as info:
        M.load_benchmark(root, ratio)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "not parquet"])
def test_an_unreadable_parquet_file_names_the_config(tmp_path, damage):
    root = write_fixture(tmp_path)
    file = root / "retain_95" / "train-00000-of-00001.parquet"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PAR1 this is not a parquet file")
    with pytest.raises(M.BenchmarkFormatError, match=r"retain_95: cannot read \['train-00000-of-00001.parquet'\]"):
        M.load_benchmark(root, 5)


def test_missing_root_and_bad_ratio(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_benchmark(tmp_path / "nope")
    with pytest.raises(ValueError, match="integer percentage"):
        M.load_benchmark(tmp_path, 0)


def test_test_set_must_cover_forget_ids(tmp_path):
    root = write_fixture(tmp_path, lambda t, f: t.update(Test_Set=[r for r in t["Test_Set"] if r["ID"] != "002"]))
    with pytest.raises(M.BenchmarkFormatError, match=r"Test_Set: column 'ID': no row for forget IDs \['002'\]"):
        M.load_benchmark(root, 5)


def test_config_features_match_card():
    for config in CARD_SCHEMA:
        assert M.config_features(config) == card_features(config), config


# ------------------------------------------------------------------ on-disk layouts


def _relayout(root: Path, nested: bool, test_shards: int = 1) -> Path:
    """Rewrite each config as `<config>/train/0000.parquet` (the Hub's parquet-converter layout) when `nested`,
    and Test_Set as `test_shards` files (rows split in order, schema and its metadata kept)."""
    import pyarrow.parquet as pq

    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        (file,) = folder.glob("*.parquet")
        table = pq.read_table(file)
        file.unlink()
        shards = test_shards if folder.name == "Test_Set" else 1
        bounds = [round(k * table.num_rows / shards) for k in range(shards + 1)]
        for k in range(shards):
            part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
            name = f"{k:04d}.parquet" if nested else f"train-{k:05d}-of-{shards:05d}.parquet"
            target = folder / "train" / name if nested else folder / name
            target.parent.mkdir(exist_ok=True)
            pq.write_table(part, target)
    return root


@pytest.mark.parametrize("nested, shards", [(True, 1), (True, 2), (False, 2)],
                         ids=["parquet-converter", "parquet-converter, sharded Test_Set", "sharded Test_Set"])
def test_every_layout_loads_the_same_benchmark(fixture_root, tmp_path, nested, shards):
    import dataclasses

    root = _relayout(write_fixture(tmp_path), nested, shards)
    assert len(list((root / "Test_Set").rglob("*.parquet"))) == shards
    assert M.list_configs(root) == M.list_configs(fixture_root)
    assert M.available_forget_ratios(root) == (5, 10)
    expected = M.load_benchmark(fixture_root, 5)
    assert M.load_benchmark(root, 5) == dataclasses.replace(expected, root=str(root))


@pytest.mark.parametrize("config, ratio", [("forget_5", 5), ("Test_Set", 5), ("retain_90", 10)])
def test_a_config_folder_without_parquet_files_is_named(tmp_path, config, ratio):
    root = write_fixture(tmp_path)
    for file in (root / config).glob("*.parquet"):
        file.unlink()
    (root / config / "train").mkdir()  # an empty parquet-converter folder too
    (root / config / "README.md").write_text("not data")
    with pytest.raises(M.BenchmarkFormatError) as info:
        M.load_benchmark(root, ratio)
    message = str(info.value)
    assert message.startswith(f"{root / config}: the config folder holds no parquet files"), message
    assert f"{config}/*.parquet and {config}/train/*.parquet" in message and f"forget ratio {ratio}" in message
    assert config not in M.list_configs(root)


def test_a_config_in_both_layouts_is_refused(tmp_path):
    root = write_fixture(tmp_path)
    (root / "forget_5" / "train").mkdir()
    (root / "forget_5" / "train-00000-of-00001.parquet").rename(root / "forget_5" / "train" / "0000.parquet")
    write_fixture(tmp_path)  # and the top-level file again
    with pytest.raises(M.BenchmarkFormatError, match=r"forget_5: holds the train split twice"):
        M.load_benchmark(root, 5)
