"""The synthetic MLLMU-Bench: determinism, the published schema, loadability, distinct portraits, tokenizer."""

from __future__ import annotations

import collections
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vleraser_jax.data import mllmu as M
from vleraser_jax.data import synthetic as S

# The hand-written card schema and fixture of the loader tests (pytest puts tests/ on sys.path).
from test_data_mllmu import CARD_SCHEMA, write_fixture

SMALL = dict(seed=0, num_people=40, num_celebrities=8, image_size=32, num_test_images=2,
             num_base_portraits=20, num_base_poses=1, progress=False)


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    """datasets caches every parquet it reads; keep this module's caches out of the user's HF cache."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return S.synthesize(tmp_path_factory.mktemp("synth") / "bench", **SMALL)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _array(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32)


def test_deterministic(synth, tmp_path):
    again = S.synthesize(tmp_path / "again", **SMALL)
    assert _hashes(again) == _hashes(synth)
    other = S.synthesize(tmp_path / "other", **{**SMALL, "seed": 1})
    a = _hashes(other)
    assert a["Full_Set/train-00000-of-00001.parquet"] != _hashes(synth)["Full_Set/train-00000-of-00001.parquet"]


def test_refuses_to_overwrite(synth):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        S.synthesize(synth, **SMALL)


def test_schema_matches_published(synth, tmp_path):
    import pyarrow.parquet as pq
    from datasets import Features

    fixture = write_fixture(tmp_path / "fixture")
    for config in CARD_SCHEMA:
        ours = pq.read_schema(synth / config / "train-00000-of-00001.parquet")
        ref = pq.read_schema(fixture / config / "train-00000-of-00001.parquet")
        assert ours.names == ref.names, config
        assert ours.remove_metadata().equals(ref.remove_metadata()), config
        assert Features.from_arrow_schema(ours) == Features.from_arrow_schema(ref), config
    assert set(M.list_configs(synth)) == {*CARD_SCHEMA, "forget_15", "retain_85", "Base_Set"}


@pytest.mark.parametrize("ratio", [5, 10, 15])
def test_load_benchmark(synth, ratio):
    b = M.load_benchmark(synth, ratio)
    n = int(ratio / 100 * 40)  # data_split.py's forget size
    forget_ids = [p.person_id for p in b.forget]
    assert len(forget_ids) == n and [p.person_id for p in b.test] == forget_ids
    assert not set(forget_ids) & {p.person_id for p in b.retain}
    assert len(b.retain) == 40 - n and len(b.real) == 8
    assert all(len(t.extra_images) == 1 for t in b.test)
    assert len(b.forget_train) == 15 * n and len(b.full_train) == 15 * 40
    assert sum(r.image is None for r in b.forget_train) == 7 * n  # the named questions are text-only
    names = {p.name for p in (*b.retain, *b.forget)}
    assert len(names) == 40 and not names & {p.name for p in b.real}


def test_task_items(synth):
    people = M.load_profiles(synth, "Full_Set")
    names = [p.name for p in people]
    pools = {k: set(v) for k, v in S.FACT_POOLS.items()}
    letters = collections.Counter()
    for p in people:
        assert len(p.biography) >= 7 and p.name == p.biography["Name"]
        assert len(p.visual_mc) == 8 and len(p.textual_mc) == 7
        for mc in (*p.visual_mc, *p.textual_mc):
            letters[mc.answer] += 1
            opts = list(mc.options.values())
            assert len(set(opts)) == 4
            correct = mc.options[mc.answer]
            same_type = [set(names)] if correct in names else [pool for pool in pools.values() if correct in pool]
            assert any(set(opts) <= pool for pool in same_type), mc  # distractors of the same attribute
            assert correct == p.name or correct in p.biography.values()
        assert all(p.name in mc.question for mc in p.textual_mc)
        assert all("the person in the image" in mc.question for mc in p.visual_mc)
        for items in (p.generation, p.cloze):
            assert collections.Counter(it.type for it in items) == {"Image_Textual": 4, "Pure_Text": 4}
        for it in p.generation:
            assert it.ground_truth.endswith(".") and it.ground_truth.count(". ") == 0
        for it in p.cloze:
            assert it.question.count("__") == 1 and it.ground_truth in (p.name, *p.biography.values())
    assert max(letters.values()) - min(letters.values()) <= 1 and set(letters) == set("ABCD")

    rows = M.load_training_rows(synth)[people[0].person_id]
    assert any("the person in the image" in r.question and r.image for r in rows)
    assert any(people[0].name in r.question and r.image is None for r in rows)


def test_portraits_identify_people(synth):
    people = [*M.load_profiles(synth, "Full_Set"), *M.load_profiles(synth, "Retain_Set")]
    imgs = np.stack([_array(p.image) for p in people])
    assert imgs.shape == (48, 32, 32, 3)
    diff = np.abs(imgs[:, None] - imgs[None]).mean(axis=(2, 3, 4))
    np.fill_diagonal(diff, np.inf)
    assert diff.min() > 5.0  # mean absolute difference on 0..255, at 32x32
    train = {p.person_id: _array(p.image) for p in people}
    for t in M.load_profiles(synth, "Test_Set"):
        shots = [t.image, *t.extra_images]
        assert len(set(shots)) == len(shots)
        for b in shots:
            assert np.abs(_array(b) - train[t.person_id]).mean() > 3.0


def test_base_set(synth):
    rows = S.load_base_set(synth)
    kinds = collections.Counter(r.person_id[0] for r in rows)
    assert kinds["C"] and kinds["P"]  # celebrities and random portraits
    captions = S.load_base_set(synth, kinds=["caption"])
    assert len(captions) == 20 and all(r.image and r.answer.startswith("A portrait") for r in captions)
    mc = S.load_base_set(synth, kinds=["classification"])
    assert all(r.answer in "ABCD" and r.question.endswith(M.MC_INSTRUCTION) for r in mc)
    assert any(r.image is None for r in mc) and any(r.image is not None for r in mc)
    real_names = {p.name for p in M.load_profiles(synth, "Retain_Set")}
    fictitious = {p.name for p in M.load_profiles(synth, "Full_Set")}
    text = " ".join(r.question + " " + r.answer for r in rows)
    assert all(n in text for n in real_names) and not any(n in text for n in fictitious)
    with pytest.raises(ValueError, match="kinds"):
        S.load_base_set(synth, kinds=["poem"])


def test_tokenizer(synth, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    summary = S.train_synthetic_tokenizer(synth, out, vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert summary["image_token_id"] == tok.convert_tokens_to_ids("<image>") == 4
    assert tok.encode("<image>", add_special_tokens=False) == [4]
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    assert len(tok) == summary["vocab_size"] <= 1024 and summary["texts"] > 1000
    cfg = json.loads((out / "preprocessor_config.json").read_text())
    assert cfg["crop_size"] == {"height": 32, "width": 32}
    assert S.read_info(synth)["rows"]["Full_Set"] == 40


def test_holdout_people_are_new_and_change_nothing_else(synth, tmp_path):
    """Holdout_Set: fictitious people of the same generator, disjoint from every other config (IDs, names,
    portraits), in no training config; every other file is byte-identical to a synthesis without them."""
    from vleraser_jax.data.splits import HOLDOUT_SET, load_holdout

    with_holdout = S.synthesize(tmp_path / "holdout", **{**SMALL, "num_holdout": 6})
    a, b = _hashes(with_holdout), _hashes(synth)
    assert {k for k in a if not k.startswith(HOLDOUT_SET)} - {S.INFO_FILE} == set(b) - {S.INFO_FILE}
    assert all(a[k] == b[k] for k in b if k != S.INFO_FILE)
    holdout = load_holdout(with_holdout)
    assert load_holdout(synth) is None
    assert len(holdout.people) == 6 and len(holdout.rows) == 6 * 15
    ids = {p.person_id for p in holdout.people}
    names = {p.name for p in holdout.people}
    bench = M.load_benchmark(with_holdout, 5)
    everyone = bench.forget + bench.retain + bench.real
    assert not ids & {p.person_id for p in everyone} and not names & {p.name for p in everyone}
    assert not {p.image for p in holdout.people} & {p.image for p in everyone}
    trained = {r.person_id for r in bench.full_train} | {r.person_id for r in S.load_base_set(with_holdout)}
    assert not ids & trained
    assert {r.person_id for r in holdout.rows} == ids and all(r.question and r.answer for r in holdout.rows)


def test_unique_fact_values_give_no_two_people_a_shared_fact(tmp_path):
    """fact_values='unique': every fact's value belongs to one person only (fictitious, celebrities and holdout;
    the towns of Born, Residence and the schools apart too). Multiple-choice distractors are values no one has,
    the evaluation items' disjoint from the training rows' (`fact_pools` reads both back), so no option can be
    ruled out as someone else's and no evaluation distractor was ever a training row's wrong answer."""
    from vleraser_jax.data.splits import load_holdout

    root = S.synthesize(tmp_path / "unique", **{**SMALL, "num_holdout": 4, "fact_values": "unique"})
    bench = M.load_benchmark(root, 5)
    people = [*bench.forget, *bench.retain, *bench.real, *load_holdout(root).people]
    assert len(people) == 52
    for key in S.FACT_KEYS:
        values = [p.biography[key] for p in people]
        assert len(set(values)) == len(values), key
    towns = [p.biography[k] for p in people for k in ("Born", "Residence")]
    towns += [p.biography["Education"].rsplit(" ", 1)[0] for p in people]
    assert len(set(towns)) == len(towns)
    held = {v for p in people for k, v in p.biography.items() if k != "Name"}
    training, evaluation = S.fact_pools(root, "training"), S.fact_pools(root, "evaluation")
    for key in S.FACT_KEYS:
        assert len(training[key]) == len(evaluation[key]) == 24, key
        assert not set(training[key]) & set(evaluation[key]) and not held & (set(training[key]) | set(evaluation[key]))
    for p in people:
        for mc in p.visual_mc[1:] + p.textual_mc:  # the name question's options are names
            distractors = {o for letter, o in mc.options.items() if letter != mc.answer}
            assert mc.options[mc.answer] in held and len(distractors) == 3, mc
            assert any(distractors <= set(evaluation[k]) for k in S.FACT_KEYS), mc
    base_options = [line[3:] for r in S.load_base_set(root, kinds=("classification",))
                    for line in r.question.split("\n") if line[:3] in ("A: ", "B: ", "C: ", "D: ")]
    names = {p.name for p in people}
    assert base_options and not set(base_options) & {v for vs in evaluation.values() for v in vs}
    assert set(base_options) <= held | names | {v for vs in training.values() for v in vs}
    assert S.fact_pools(S.synthesize(tmp_path / "shared", **SMALL)) == S.FACT_POOLS
    assert S.read_info(root)["fact_values"] == "unique"
    with pytest.raises(ValueError, match="purpose"):
        S.fact_pools(root, "test")


def test_unique_fact_values_refuse_more_people_than_they_can_tell_apart(tmp_path):
    from vleraser_jax.data.synthetic.people import UNIQUE_CAPACITY

    with pytest.raises(ValueError, match=f"at most {UNIQUE_CAPACITY} people"):
        S.synthesize(tmp_path / "big", **{**SMALL, "num_people": UNIQUE_CAPACITY, "fact_values": "unique"})
    with pytest.raises(ValueError, match="fact_values='distinct'"):
        S.synthesize(tmp_path / "bad", **{**SMALL, "fact_values": "distinct"})
    assert not (tmp_path / "big").exists()  # refused before anything is written


def test_data_synth_command_writes_unique_facts(tmp_path, capsys):
    from vleraser_jax import cli

    out = tmp_path / "bench"
    assert cli.main(["data", "synth", "--out", str(out), "--people", "20", "--celebrities", "4", "--image-size", "16",
                     "--holdout", "0", "--fact-values", "unique"]) == 0
    assert S.read_info(out)["fact_values"] == "unique" and '"fact_values": "unique"' in capsys.readouterr().out
    pets = [p.biography["Pet"] for p in M.load_profiles(out, "Full_Set")]
    assert len(set(pets)) == 20
