"""The base/vanilla machinery on a toy config: batch schedule, cache keys, cache reuse, HF export."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from vleraser_jax.data import batching
from vleraser_jax.train import recipes, stages, workspace
from vleraser_jax.config import load_config
from vleraser_jax.data import mllmu
from vleraser_jax.processing import load_processor

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_llava.py"
TOY = [
    "data.num_people=20", "data.num_celebrities=4", "data.num_base_portraits=6", "data.num_base_poses=1",
    "data.image_size=16", "data.vocab_size=512",
    "model.vision_hidden_size=16", "model.vision_intermediate_size=32", "model.vision_layers=2",
    "model.vision_heads=2", "model.patch_size=8", "model.hidden_size=32", "model.intermediate_size=64",
    "model.layers=1", "model.heads=2", "model.kv_heads=1", "model.max_position_embeddings=256",
    "base.steps=3", "base.batch_size=4", "base.warmup_steps=1", "base.length_buckets=1", "base.mc_variants=1",
    "oracle.steps=2", "oracle.batch_size=4", "oracle.warmup_steps=1", "oracle.length_buckets=1",
    "oracle.task_variants=1",
    "vanilla.steps=2", "vanilla.batch_size=4", "vanilla.warmup_steps=1", "vanilla.length_buckets=1",
    "vanilla.task_variants=1", "data.validation_people=2", "data.num_holdout=3",
]


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


def toy_config(work_dir: Path, *extra: str):
    return load_config(CONFIG, [*TOY, f"work_dir={work_dir}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy config with the three stages trained once; (config, base dir, vanilla dir, log lines)."""
    c = toy_config(tmp_path_factory.mktemp("work"))
    lines: list[str] = []
    vanilla = stages.run_stage(c, "vanilla", log=lines.append)
    return c, workspace.stage_dir(c, "base"), vanilla, lines


def _toy_data(n_text: int, n_image: int, seed: int = 0) -> batching.Tokenized:
    rng = np.random.default_rng(seed)
    n = n_text + n_image
    lengths = rng.integers(5, 30, size=n)
    mask = (np.arange(32)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(3, 50, size=(n, 32)), 0).astype(np.int32)
    image_index = np.r_[np.full(n_text, -1), np.arange(n_image)]
    pixels = rng.standard_normal((n_image, 3, 4, 4)).astype(np.float32)
    return batching.Tokenized(ids, ids.copy(), mask, image_index, pixels)


def test_batch_schedule_is_pure_and_keeps_pools_apart():
    data, other = _toy_data(37, 23), _toy_data(11, 0, seed=1)
    make = lambda: batching.BatchSchedule([(data, 1.0), (other, 2.0)], batch_size=4, steps=60, seed=3, length_buckets=2)
    a, b = make(), make()
    shapes = {}
    for step in range(60):
        x, y = a(step), b(step)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        again = a(step)  # asking twice gives the same batch
        assert all(np.array_equal(x[k], again[k]) for k in x)
        k = a.pool_of_step[step]
        shapes.setdefault(k, set()).add(x["input_ids"].shape)
        has_image = "pixel_values" in x
        assert has_image == a.pools[k][2]
        assert x["pixel_values"].shape[0] == 4 if has_image else True
        # rows of one kind only: every row of an image batch has an image, none of a text batch does
        rows = a.orders[k][a.start[step]: a.start[step] + 4]
        source = a.pools[k][0]
        assert ((source.image_index[rows] >= 0) == has_image).all()
        assert (source.attention_mask[rows].sum(1) <= x["input_ids"].shape[1]).all()
    assert all(len(s) == 1 for s in shapes.values())  # one fixed shape per pool
    assert len(a.shapes) <= 4  # at most length_buckets lengths per kind of row
    assert a.padding_fraction() < batching.BatchSchedule([(data, 1.0), (other, 2.0)], 4, 60, 3).padding_fraction()
    c = batching.BatchSchedule([(data, 1.0), (other, 2.0)], batch_size=4, steps=60, seed=4, length_buckets=2)
    assert any(not np.array_equal(a(s)["input_ids"], c(s)["input_ids"]) for s in range(60) if a(s)["input_ids"].shape == c(s)["input_ids"].shape)


def test_bucket_edges_minimise_padding():
    assert batching.bucket_edges([10, 10, 30, 31], 1) == [32]
    assert batching.bucket_edges([10, 10, 30, 31], 2) == [16, 32]
    assert batching.bucket_edges([10, 10, 30, 31], 2, min_rows=3) == [32]  # a bucket must fill a batch
    assert batching.bucket_edges([7, 8, 9], 5) == [8, 16]


def test_stage_key_tracks_only_relevant_fields(tmp_path):
    c = toy_config(tmp_path)
    keys = lambda d: tuple(workspace.stage_key(d, s) for s in workspace.STAGES)
    base, oracle, vanilla = keys(c)
    for irrelevant in ("eval.batch_size=7", f"work_dir={tmp_path / 'elsewhere'}", "data.num_holdout=5"):
        assert keys(toy_config(tmp_path, irrelevant)) == (base, oracle, vanilla), irrelevant
    for split in ("data.forget_ratio=10", "data.validation_people=3"):  # who the oracle is retrained without
        d = toy_config(tmp_path, split)
        assert workspace.stage_key(d, "base") == base, split
        assert workspace.stage_key(d, "oracle") != oracle and workspace.stage_key(d, "vanilla") != vanilla, split
    d = toy_config(tmp_path, "vanilla.steps=5")
    assert keys(d)[:2] == (base, oracle) and workspace.stage_key(d, "vanilla") != vanilla
    d = toy_config(tmp_path, "oracle.steps=5")  # the vanilla continues the oracle
    assert workspace.stage_key(d, "base") == base and keys(d)[1:] != (oracle, vanilla)
    assert workspace.stage_key(d, "vanilla") != vanilla
    for relevant in ("base.steps=4", "model.hidden_size=16", "data.num_people=21", "seed=1", "base.mc_variants=2"):
        d = toy_config(tmp_path, relevant)
        assert workspace.stage_key(d, "base") != base and workspace.stage_key(d, "vanilla") != vanilla, relevant
    with pytest.raises(ValueError, match="stage"):
        workspace.stage_key(c, "pretrain")


def test_fact_values_shared_keeps_every_older_key_and_unique_makes_new_ones(tmp_path):
    """'shared' (the default) is left out of the benchmark's and the stages' keys, so everything cached or committed
    before the field stays valid; 'unique' is another benchmark and other stages."""
    c = toy_config(tmp_path)
    keys = lambda d: (workspace.data_root(d), *(workspace.stage_key(d, s) for s in workspace.STAGES))
    older = toy_config(tmp_path)
    del older.data["fact_values"]
    assert keys(older) == keys(c)
    unique = toy_config(tmp_path, "data.fact_values=unique")
    assert all(a != b for a, b in zip(keys(unique), keys(c)))


def test_unique_fact_values_train_with_distractors_no_one_has(trained, tmp_path):
    """With unique facts every training multiple-choice row about a fact offers the person's value and three values
    of the benchmark's training distractor pool (no one's, and never an evaluation item's distractor), so the
    oracle never meets an excluded person's value even as a wrong answer; the shared benchmark's info file written
    before the field (no `fact_values`) still matches a config that says "shared"."""
    from vleraser_jax.data import synthetic

    c = toy_config(tmp_path, "data.fact_values=unique")
    root, _ = workspace.prepare_data(c, log=lambda *_: None)
    training, evaluation = synthetic.fact_pools(root, "training"), synthetic.fact_pools(root, "evaluation")
    profiles = [p for config in (mllmu.FULL_SET, mllmu.RETAIN_SET) for p in mllmu.load_profiles(root, config)]
    names = {p.name for p in profiles}
    held = {v for p in profiles for k, v in p.biography.items() if k != "Name"}
    processor = load_processor(trained[2])  # any processor: the test reads the prompts' text
    rows = [ex for examples, _ in recipes.stage_examples(c, "oracle", root, processor) for ex in examples]
    options = [[line[3:] for line in ex["prompt"].split("\n") if line[:3] in ("A: ", "B: ", "C: ", "D: ")]
               for ex in rows]
    options = [o for o in options if o and not set(o) <= names]  # the fact questions (the name one has names)
    assert len(options) > 20
    for o in options:
        correct = [v for v in o if v in held]
        assert len(o) == 4 and len(correct) == 1, o
        assert any(set(o) - set(correct) <= set(training[k]) for k in synthetic.FACT_KEYS), o
    assert not {v for o in options for v in o} & {v for vs in evaluation.values() for v in vs}
    shared = toy_config(tmp_path)
    root, _ = workspace.prepare_data(shared, log=lambda *_: None)
    info = synthetic.read_info(root)
    del info["fact_values"]
    (root / synthetic.INFO_FILE).write_text(json.dumps(info))
    assert workspace.prepare_data(shared, log=lambda *_: None)[0] == root


def test_run_stage_caches(trained):
    c, base_dir, vanilla_dir, lines = trained
    assert (base_dir / "config.json").exists() and (vanilla_dir / "config.json").exists()
    assert any("base" in line and "trained" in line for line in lines)
    again: list[str] = []
    assert stages.run_stage(c, "vanilla", log=again.append) == vanilla_dir
    assert again == [f"vanilla: reusing {vanilla_dir}"]
    assert any(line.startswith("oracle: trained") for line in lines)


def _mentions(examples, names) -> set[str]:
    return {n for n in names for ex in examples if n in ex["prompt"] or n in ex["answer"]}


def test_each_stage_trains_on_the_right_people(trained):
    """The oracle's rows never name a forget or validation person (not even as a distractor option), the vanilla
    adds exactly those people, no stage ever sees a holdout person, and the task formats are opt-in."""
    from vleraser_jax.data.splits import load_holdout, oracle_excluded_ids

    c = trained[0]
    root = workspace.data_root(c)
    bench = mllmu.load_benchmark(root, c.data.forget_ratio)
    processor = load_processor(trained[2])
    forget, validation = oracle_excluded_ids(root, c.data.forget_ratio, c.data.validation_people, c.seed)
    assert len(forget) == 3 and len(validation) == 2
    names = {p.person_id: p.name for p in (*bench.forget, *bench.retain)}
    excluded = {names[i] for i in forget + validation}
    holdout = {p.name for p in load_holdout(root).people}
    assert len(holdout) == 3
    stages_ = {s: recipes.stage_examples(c, s, root, processor) for s in workspace.STAGES}
    everything = [ex for s in stages_.values() for examples, _ in s for ex in examples]
    assert not _mentions(everything, holdout)  # holdout people: in no stage's rows
    oracle_rows = [ex for examples, _ in stages_["oracle"] for ex in examples]
    assert not _mentions(oracle_rows, excluded)
    new_rows, replay = stages_["vanilla"][0][0], stages_["vanilla"][1][0]
    assert _mentions(new_rows, set(names.values())) >= excluded
    assert replay == stages_["oracle"][0][0]  # the vanilla replays exactly the oracle's data
    shares = [share for _, share in stages_["vanilla"]]
    assert sum(shares) == pytest.approx(1.0) and shares[-1] == pytest.approx(c.vanilla.base_replay)
    eval_questions = {it.question for p in bench.retain for it in (*p.visual_mc, *p.textual_mc)}
    fictitious = stages_["oracle"][0][0]  # (Base_Set, replayed, asks celebrities in every wording)
    assert not any(q in ex["prompt"] for q in eval_questions for ex in fictitious)  # training wording only
    off = toy_config(Path(c.work_dir), "oracle.task_variants=0")
    rows = recipes.stage_examples(off, "oracle", root, processor)[0][0]
    kept = [r for r in bench.full_train if r.person_id not in set(forget + validation)]
    assert len(rows) == len(kept) and len({r.person_id for r in kept}) == 20 - 5  # ft_Data alone


def test_saved_model_loads_in_transformers(trained):
    import torch
    from transformers import LlavaForConditionalGeneration

    _, base_dir, vanilla_dir, _ = trained
    for path in (base_dir, vanilla_dir):
        model, info = LlavaForConditionalGeneration.from_pretrained(str(path), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        ids = torch.tensor([[1, 5, 6, 7]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()


def test_a_mesh_section_trains_the_same_model(trained, tmp_path):
    """With `c.mesh` set, the stage trains through the sharded path (here a 1-device mesh): same weights."""
    import ml_collections

    from vleraser_jax import parallel
    from vleraser_jax.checkpoints import load_pretrained

    c0, base_dir, _, _ = trained
    c = toy_config(tmp_path / "work")
    with c.unlocked():
        c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    assert parallel.sharder_for(c) is not None and parallel.sharder_for(c0) is None
    sharded_dir = stages.run_stage(c, "base", log=lambda m: None)
    _, ref, _ = load_pretrained(base_dir)
    _, got, _ = load_pretrained(sharded_dir)
    import jax

    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_vanilla_lora_from_a_checkpoint_changes_only_lm_linears_by_low_rank(trained, tmp_path):
    """The 7B recipe at toy size: `model.checkpoint` is the base (nothing retrained), `vanilla.epochs` sets the
    steps, and a rank-2 LoRA on every LM linear is merged: every other weight is bit-identical to the base and
    each LM linear moved by a matrix of rank <= 2."""
    import json

    from flax import traverse_util

    from vleraser_jax.checkpoints import load_pretrained
    from vleraser_jax.unlearn import lora as lora_lib

    _, base_dir, _, _ = trained
    c = toy_config(tmp_path, f"model.checkpoint={base_dir}", "vanilla.lora_rank=2", "vanilla.lora_alpha=4",
                   "vanilla.steps=0", "vanilla.base_replay=0.0", "vanilla.learning_rate=0.01", "vanilla.from_oracle=False")
    with c.unlocked():
        c.vanilla.epochs = 0.01
    lines: list[str] = []
    assert stages.run_stage(c, "base", log=lines.append) == base_dir and lines == [f"base: the pretrained checkpoint {base_dir}"]
    out = stages.run_stage(c, "vanilla", log=lines.append)
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    rows = 20 * 15 * 2 + len(mllmu.load_benchmark(workspace.data_root(c), 5).full_train)  # task rows + ft_Data
    assert meta["lora_rank"] == 2 and meta["steps"] == -(-int(0.01 * rows) // 4)
    _, before, _ = load_pretrained(base_dir)
    _, after, _ = load_pretrained(out)
    targeted = {tuple(p.split("/")) + ("kernel",) for p in lora_lib.target_paths(before, lora_lib.LM_LINEARS)}
    flat_before, flat_after = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
    assert len(targeted) == 7  # one block: q, k, v, o, gate, up, down
    for path, old in flat_before.items():
        new = np.asarray(flat_after[path], np.float64)
        if path in targeted:
            delta = new - np.asarray(old, np.float64)
            singular = np.linalg.svd(delta, compute_uv=False)
            assert singular[0] > 0 and (singular[2:] <= 1e-5 * singular[0]).all(), (path, singular[:4])
        else:
            np.testing.assert_array_equal(new, np.asarray(old), err_msg="/".join(path))


def test_the_7b_config_vanilla_section_trains_as_written(trained, tmp_path):
    """configs/llava_1_5_7b.py's vanilla stage (MLLMU-Bench's LoRA recipe, epochs, mesh, orbax saves) runs as
    written on a toy checkpoint and an MLLMU-layout benchmark; only the epochs and the CPU dtype are changed."""
    import json

    _, base_dir, _, _ = trained
    overrides = [f"model.checkpoint={base_dir}", f"data.root={workspace.data_root(trained[0])}", f"work_dir={tmp_path}",
                 "model.dtype=float32", "model.attention=xla", "vanilla.epochs=0.03"]
    c = load_config(CONFIG.with_name("llava_1_5_7b.py"), [*overrides, "vanilla.save_every=2"])
    assert c.model.remat == "full" and workspace.model_runtime(c)["remat"] == "full"  # the loaded model remats
    out = stages.run_stage(c, "vanilla", log=lambda *_: None)
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["lora_rank"] == 16 and meta["steps"] >= 2 and meta["resumed_from"] is None
    assert load_processor(out).family == "llava"
    # the periodic saves served the run and are gone once the model is exported, so a forced rerun trains
    # again from step 0 (it does not "resume" a finished run) and, seeded, ends with the same weights
    assert not out.with_name(out.name + ".ckpt").exists()
    from vleraser_jax.checkpoints import load_pretrained

    _, first, _ = load_pretrained(out)
    assert stages.run_stage(c, "vanilla", force=True, log=lambda *_: None) == out
    again = json.loads(out.with_name(out.name + ".json").read_text())
    assert again["resumed_from"] is None and again["final_loss"] == meta["final_loss"]
    _, second, _ = load_pretrained(out)
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # save_every only changes how the run executes: same stage key, so a restarted run finds its checkpoints
    other = load_config(CONFIG.with_name("llava_1_5_7b.py"), [*overrides, "vanilla.save_every=7"])
    assert workspace.stage_key(other, "vanilla") == workspace.stage_key(c, "vanilla")
    assert workspace.stage_key(load_config(CONFIG.with_name("llava_1_5_7b.py"), [*overrides, "vanilla.epochs=0.04"]),
                        "vanilla") != workspace.stage_key(c, "vanilla")
    with pytest.raises(ValueError, match="data.root must be set"):
        stages.run_stage(load_config(CONFIG.with_name("llava_1_5_7b.py"), [f"work_dir={tmp_path}"]), "vanilla")
    with pytest.raises(ValueError, match="model.checkpoint must be set"):
        stages.run_stage(load_config(CONFIG.with_name("llava_1_5_7b.py"), overrides[1:3]), "vanilla", log=lambda *_: None)


# ------------------------------------------------------------------ tiny_qwen2vl: the same stages on Qwen2-VL

QWEN_CONFIG = CONFIG.with_name("tiny_qwen2vl.py")
QWEN_TOY = [*(o for o in TOY if not o.startswith("model.patch_size")), "model.patch_size=4",
            "model.mrope_section=(2,3,3)"]


@pytest.fixture(scope="module")
def qwen_trained(tmp_path_factory):
    """tiny_qwen2vl at toy size with its stages trained once; (config, base dir, vanilla dir)."""
    c = load_config(QWEN_CONFIG, [*QWEN_TOY, f"work_dir={tmp_path_factory.mktemp('qwen')}"])
    vanilla = stages.run_stage(c, "vanilla", log=lambda *_: None)
    return c, workspace.stage_dir(c, "base"), vanilla


def test_qwen2vl_stages_export_models_transformers_runs_identically(qwen_trained):
    """Both stages train through Qwen2-VL's processor (chat template, patches + grid) and export checkpoints
    that transformers loads with no missing keys and whose logits on an image prompt equal ours."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from vleraser_jax.checkpoints import load_pretrained

    c, base_dir, vanilla_dir = qwen_trained
    llava_family = load_config(QWEN_CONFIG, [*QWEN_TOY, f"work_dir={c.work_dir}", "family=llava"])
    assert workspace.stage_key(c, "base") != workspace.stage_key(llava_family, "base")  # the family alone changes the key
    for path in (base_dir, vanilla_dir):
        processor = load_processor(path)
        assert processor.family == "qwen2_vl"
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
        batch = processor([processor.build_prompt("Who is this?")], images=[image])
        assert (batch["image_grid_thw"] == [[1, 4, 4]]).all()  # 16 px, 4 px patches: kept at size, 2x2 merged
        model, params, _ = load_pretrained(path)
        ours = np.asarray(model.apply({"params": params}, **batch).logits)
        torch_model, info = Qwen2VLForConditionalGeneration.from_pretrained(str(path), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            mm_types = (batch["input_ids"] == processor.image_token_id).astype(np.int64)  # what its processor adds
            theirs = torch_model(**{k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "i" else v)
                                    for k, v in batch.items()},
                                 mm_token_type_ids=torch.from_numpy(mm_types)).logits.numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_qwen2vl_tokenized_images_rebuild_the_processor_batch(qwen_trained):
    """Tokenized keeps each image's patches apart (deduplicated); a batch reassembles exactly what the
    processor gives for those rows: concatenated patches in row order and their grids."""
    c, _, vanilla_dir = qwen_trained
    processor = load_processor(vanilla_dir)
    bench = mllmu.load_benchmark(workspace.data_root(c), c.data.forget_ratio)
    rows = [r for r in bench.full_train if r.image is not None][:6]
    rows = rows + rows[:2]  # repeated images are stored once
    examples = [batching.qa_example(processor, r) for r in rows]
    data = batching.tokenize(processor, examples, 128)
    assert data.pixels.shape[0] == len({r.image for r in rows}) and data.grids.shape == (data.pixels.shape[0], 3)
    pick = np.array([7, 0, 3])
    decoded = lambda data: Image.open(io.BytesIO(data)).convert("RGB")
    ref = processor.collate_for_training([{**examples[i], "image": decoded(rows[i].image)} for i in pick],
                                         max_length=128)
    got = data.image_inputs(pick)
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(got["pixel_values"], ref["pixel_values"])
    n = ref["input_ids"].shape[1]
    np.testing.assert_array_equal(data.input_ids[pick, :n], ref["input_ids"])
    assert (data.input_ids[pick, n:] == processor.pad_token_id).all()

    # images that keep different resolutions (Qwen2-VL's dynamic resolution) are stored apart, not refused
    def encoded(width, height):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(width).integers(0, 255, (height, width, 3), np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    mixed = [{**examples[0], "image": encoded(16, 16)}, {**examples[1], "image": encoded(8, 16)}]
    data = batching.tokenize(processor, mixed, 128)
    assert isinstance(data.pixels, list) and [p.shape[0] for p in data.pixels] == [16, 8]
    ref = processor.collate_for_training([{**ex, "image": decoded(ex["image"])} for ex in mixed], max_length=128)
    got = data.image_inputs(np.array([0, 1]))
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(got["pixel_values"], ref["pixel_values"])
