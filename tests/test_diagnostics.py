"""Issue #7: module reload (`swap_modules`), the quantization and relearning attacks, the report's extra
tables, and a smoke run of `run_experiment`'s diagnostics on a tiny random LLaVA."""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from vleraser_jax import cli
from vleraser_jax.data.mllmu import Benchmark, MultipleChoice, OpenItem, Profile, TrainingRow
from vleraser_jax.eval import diagnostics as dg
from vleraser_jax.eval.report import ReportError, load_diagnostics, load_results, write_diagnostics, write_report
from vleraser_jax.eval.report_diagnostics import cost_ratios
from vleraser_jax.eval.report_tables import render_markdown
from vleraser_jax.models.configs import (CLIPVisionConfig, ConfigError, LlavaConfig, Qwen2VLConfig,
                                         Qwen2VLVisionConfig, TextConfig)
from vleraser_jax.models.llava import LlavaForConditionalGeneration
from vleraser_jax.models.qwen2_vl import Qwen2VLForConditionalGeneration


pytestmark = pytest.mark.usefixtures("quick_compiles")  # conftest: compiles dominate these runs


def flat(tree) -> dict[str, object]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def snapshot(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in flat(tree).items()}


def assert_unchanged(tree, before: dict[str, np.ndarray]):
    now = flat(tree)
    assert set(now) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(now[k]), v, err_msg=k)


# ------------------------------------------------------------------ swap_modules


def tiny_model(family: str):
    text = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0,
                      **({"qkv_bias": True, "model_type": "qwen2_vl_text",
                          "rope": (("mrope_section", (2, 3, 3)), ("rope_theta", 10000.0), ("rope_type", "default"))}
                         if family == "qwen2_vl" else {}))
    if family == "llava":
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=14, patch_size=7)
        return LlavaForConditionalGeneration(LlavaConfig(vision=vision, text=text, image_token_index=60,
                                                         image_seq_length=4, vision_feature_layer=-1))
    vision = Qwen2VLVisionConfig(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision=vision, text=text, image_token_id=60))


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def two_trees(request):
    from vleraser_jax.train.tiny_models import init_from_scratch

    model = tiny_model(request.param)
    return request.param, init_from_scratch(model, 0), init_from_scratch(model, 1)


def expected_module(family: str, path: str) -> str:
    """The issue's names, written out independently of FAMILY_MODULES."""
    if family == "llava":
        return {"projector": "projector", "vision": "vision"}.get(path.split("/")[0], "llm")
    if path.startswith("vision/merger/"):
        return "projector"
    return "vision" if path.startswith("vision/") else "llm"


@pytest.mark.parametrize("which", dg.MODULES)
def test_swap_modules_puts_back_exactly_the_vanilla_module(two_trees, which):
    family, vanilla, unlearned = two_trees
    before_u, before_v = snapshot(unlearned), snapshot(vanilla)
    assert dg.model_family(unlearned) == family
    out = dg.swap_modules(unlearned, vanilla, which)
    fu, fv, fo = flat(unlearned), flat(vanilla), flat(out)
    assert set(fo) == set(fu)
    swapped = {k for k in fo if expected_module(family, k) == which}
    assert swapped and len(swapped) < len(fo)
    for k in fo:
        assert fo[k] is (fv[k] if k in swapped else fu[k]), k  # leaves shared, never copied
    if family == "qwen2_vl":
        merger = {k for k in fo if k.startswith("vision/merger/")}
        assert (swapped == merger) if which == "projector" else not (swapped & merger)
    assert_unchanged(unlearned, before_u)
    assert_unchanged(vanilla, before_v)
    named = flat(dg.swap_modules(unlearned, vanilla, which, family=family))
    assert all(named[k] is fo[k] for k in fo)


@pytest.mark.parametrize("which", dg.MODULES)
def test_a_module_is_unchanged_only_when_every_value_is_vanilla_s(two_trees, which):
    from flax import traverse_util

    family, vanilla, other = two_trees
    assert not dg.module_unchanged(other, vanilla, which)  # another init: every module differs
    swapped = dg.swap_modules(other, vanilla, which)
    assert dg.module_unchanged(swapped, vanilla, which)  # leaves shared
    copied = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), swapped)
    assert dg.module_unchanged(copied, vanilla, which)  # equal values, other arrays
    flat_c = traverse_util.flatten_dict(copied)
    key = next(k for k in flat_c if dg.module_of(k, family) == which)
    flat_c[key] = flat_c[key].at[(0,) * flat_c[key].ndim].add(1.0)  # one value of the module moved
    assert not dg.module_unchanged(traverse_util.unflatten_dict(flat_c), vanilla, which)


def test_swap_modules_fails_clearly(two_trees):
    family, vanilla, unlearned = two_trees
    with pytest.raises(ValueError, match="unknown model family"):
        dg.swap_modules({"img": {"w": np.zeros(2)}, "llm": {"w": np.zeros(2)}}, vanilla, "projector")
    with pytest.raises(ValueError, match="unknown model family 'paligemma'"):
        dg.swap_modules(unlearned, vanilla, "projector", family="paligemma")
    with pytest.raises(ValueError, match="which must be one of"):
        dg.swap_modules(unlearned, vanilla, "llm")
    path = next(k for k in traverse_util.flatten_dict(vanilla) if dg.module_of(k, family) == "projector")
    bad = traverse_util.flatten_dict(vanilla)
    bad[path] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="/".join(path)):
        dg.swap_modules(unlearned, traverse_util.unflatten_dict(bad), "projector")


# ------------------------------------------------------------------ quantization


def quant_tree():
    rng = np.random.default_rng(0)
    magnitudes = np.geomspace(1e-3, 10.0, 24).astype(np.float32)  # per-channel scales must differ
    kernel = rng.standard_normal((16, 24)).astype(np.float32) * magnitudes
    kernel[:, 5] = 0.0  # an all-zero output channel
    return {
        "llm": {
            "embed_tokens": {"embedding": rng.standard_normal((40, 16)).astype(np.float32)
                             * np.geomspace(1e-3, 10.0, 40, dtype=np.float32)[:, None]},
            "layers_0": {"mlp": {"kernel": kernel, "bias": rng.standard_normal(24).astype(np.float32)},
                         "norm": {"scale": rng.standard_normal(16).astype(np.float32)}},
            "lm_head": {"kernel": jnp.asarray(rng.standard_normal((16, 40)), jnp.bfloat16)},
        },
        "vision": {"patch": {"kernel": rng.standard_normal((3, 3, 3, 8)).astype(np.float32)},
                   "class_embedding": rng.standard_normal(8).astype(np.float32)},
    }


@pytest.mark.parametrize("bits", dg.QUANT_BITS)
def test_quantize_params_properties(bits):
    tree = quant_tree()
    before = snapshot(tree)
    out = dg.quantize_params(tree, bits)
    assert_unchanged(tree, before)  # pure
    fi, fo = flat(tree), flat(out)
    rounded = {"llm/embed_tokens/embedding": 1, "llm/layers_0/mlp/kernel": 0, "llm/lm_head/kernel": 0}
    assert {"/".join(k): a for k, a in dg.quantization_axes(tree).items()} == rounded
    for name in set(fi) - set(rounded):  # biases, norm scales, conv kernels, 1-D parameters untouched
        assert fo[name] is fi[name], name
    qmax = {8: 127, 4: 7}[bits]
    for name, axis in rounded.items():
        w = np.asarray(fi[name], np.float32)
        q = np.asarray(fo[name], np.float32)
        assert fo[name].dtype == fi[name].dtype and fo[name].shape == fi[name].shape
        scale = np.abs(w).max(axis=axis, keepdims=True) / qmax  # one step per output channel
        assert np.isfinite(q).all()
        tol = 1e-6 * np.abs(w).max(axis=axis, keepdims=True)
        if fi[name].dtype == jnp.bfloat16:  # the dequantized value is stored back in bf16
            tol = tol + np.abs(w).max(axis=axis, keepdims=True) * 2.0 ** -8
        assert (np.abs(w - q) <= scale / 2 + tol).all(), name
        levels = np.where(scale > 0, q / np.where(scale > 0, scale, 1), 0)
        if fi[name].dtype != jnp.bfloat16:
            np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        assert np.abs(np.round(levels)).max() <= qmax
        for row in (q.T if axis == 0 else q):  # one output channel per row
            assert len(np.unique(row)) <= 2 ** bits
    np.testing.assert_array_equal(np.asarray(fo["llm/layers_0/mlp/kernel"])[:, 5], 0.0)
    # per channel, not per tensor: the 1e-3-magnitude column keeps its values (one tensor-wide step, ~10/qmax,
    # would round them all to zero)
    small = np.asarray(fo["llm/layers_0/mlp/kernel"])[:, 0]
    assert np.count_nonzero(small) > 8 and np.abs(small - fi["llm/layers_0/mlp/kernel"][:, 0]).max() < 1e-3 / qmax


def test_quantize_params_rejects_other_bit_widths():
    with pytest.raises(ValueError, match="bits must be one of"):
        dg.quantize_params(quant_tree(), 3)


# ------------------------------------------------------------------ relearning: split and step


def test_split_people_is_disjoint_deterministic_and_seeded():
    ids = [f"p{i}" for i in range(7)]
    a, b = dg.split_people(ids, seed=0)
    assert not set(a) & set(b) and set(a) | set(b) == set(ids) and (len(a), len(b)) == (4, 3)
    assert dg.split_people(list(reversed(ids)) + ids[:2], seed=0) == (a, b)  # order and repeats do not matter
    assert any(dg.split_people(ids, seed=s) != (a, b) for s in range(1, 6))
    with pytest.raises(ValueError, match="at least 2"):
        dg.split_people(["p0"])


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def person(pid: str, seed: int) -> Profile:
    name = f"Mara Quill {pid}"
    opts = {"A": "Oslo", "B": "Lima", "C": "Pune", "D": "Kobe"}
    return Profile(
        person_id=pid, name=name, image=png(seed), biography={"Name": name, "Born": "Oslo"},
        visual_mc=(MultipleChoice("Where was the person in the image born?", opts, "A"),),
        textual_mc=(MultipleChoice(f"Where was {name} born?", opts, "B"),),
        generation=(OpenItem("What does the person in the image do?", "She is a painter.", "Image_Textual"),
                    OpenItem(f"What does {name} do?", "She is a painter.", "Pure_Text")),
        cloze=(OpenItem("The person in the image was born in __.", "Oslo", "Image_Textual"),
               OpenItem(f"{name} was born in __.", "Oslo", "Pure_Text")),
    )


@pytest.fixture(scope="module")
def bench():
    people = [person(f"p{i}", i) for i in range(5)]
    rows = tuple(r for p in people[:2] for r in (
        TrainingRow(p.person_id, "Who is this person?", f"This is {p.name}.", p.image),
        TrainingRow(p.person_id, f"Where was {p.name} born?", "In Oslo.", None)))
    return Benchmark(root="memory", forget_ratio=5, forget=tuple(people[:2]), test=(people[0],),
                     retain=tuple(people[2:4]), real=(people[4],), forget_train=rows, retain_train=(), full_train=())


def test_restrict_forget_keeps_only_the_chosen_people(bench):
    b = dg.restrict_forget(bench, ["p1"])
    assert [p.person_id for p in b.forget] == ["p1"] and {r.person_id for r in b.forget_train} == {"p1"}
    assert b.retain == bench.retain and b.real == bench.real
    with pytest.raises(ValueError, match="p9"):
        dg.restrict_forget(bench, ["p9"])


@pytest.fixture(scope="module")
def tiny(full_checkpoint):
    from vleraser_jax.checkpoints import load_pretrained
    from vleraser_jax.processing import load_processor

    model, params, _ = load_pretrained(full_checkpoint)
    return model, params, load_processor(full_checkpoint)


def test_relearn_changes_only_the_trainable_parameters(tiny, bench):
    model, params, processor = tiny
    before = snapshot(params)
    cfg = dg.RelearnConfig(steps=2, batch_size=2, max_length=128, trainable=r"^llm/layers_0/mlp/", learning_rate=1e-3)
    out, info = dg.relearn(model, params, processor, bench.forget_train, cfg)
    assert_unchanged(params, before)
    fp, fo = flat(params), flat(out)
    assert set(fo) == set(fp)
    trained = {k for k in fp if k.startswith("llm/layers_0/mlp/")}
    assert trained
    for k in fp:
        if k in trained:
            assert not np.array_equal(np.asarray(fo[k]), np.asarray(fp[k])), k
        else:
            assert fo[k] is fp[k], k
    assert info["rows"] == 4 and np.isfinite(info["final_loss"])
    with pytest.raises(ValueError, match="RelearnConfig.steps"):
        dg.RelearnConfig(steps=0)


# ------------------------------------------------------------------ report tables


def results(value: float, sets=("forget",)) -> dict:
    entry = {"value": value, "ci_low": max(value - 0.1, 0.0), "ci_high": min(value + 0.1, 1.0), "n": 10}
    return {s: {m: {"classification": entry, "cloze": entry, "rougeL": entry} for m in ("visual", "textual")}
            for s in sets}


def fake_entries() -> dict:
    unl, proj, vis = results(0.3), results(0.45), results(0.31)
    q = {"unlearned": results(0.3, ("forget", "retain")), "int8": results(0.3, ("forget", "retain")),
         "int4": results(0.5, ("forget", "retain")), "bits": [8, 4]}
    q["change"] = {b: dg.difference(q[b], q["unlearned"]) for b in ("int8", "int4")}
    before, after = {"A": results(0.3), "B": results(0.25)}, {"A": results(0.9), "B": results(0.5)}
    return {
        "reload": {"family": "llava", "unlearned": unl, "projector": proj, "vision": vis,
                   "recovery": {"projector": dg.difference(proj, unl), "vision": dg.difference(vis, unl)}},
        "quantize": q,
        "relearn": {"settings": {"steps": 20, "learning_rate": 1e-4}, "people": {"A": ["p1"], "B": ["p0"]},
                    "unlearned": before, "relearned": after,
                    "recovery": {g: dg.difference(after[g], before[g]) for g in "AB"}},
    }


def test_report_renders_the_diagnostic_attack_and_cost_tables(tmp_path):
    write_report(tmp_path, "Vanilla", results(0.9), {"model": "tiny"})
    plain = json.loads((tmp_path / "results.json").read_text())
    assert "diagnostics" not in plain  # files without diagnostics keep the old layout
    write_report(tmp_path, "GA", results(0.3), diagnostics={"cost": {"run": "r1", "wall_seconds": 20.0,
                                                                      "parts": {"train_seconds": 15.0}}})
    write_report(tmp_path, "NPO", results(0.4), diagnostics={"cost": {"run": "r1", "wall_seconds": 10.0, "parts": {}}})
    write_report(tmp_path, "VL-Eraser", results(0.2), diagnostics={"cost": {"run": "r0", "wall_seconds": 9.0,
                                                                             "parts": {}}})
    write_diagnostics(tmp_path, "GA", fake_entries())
    write_diagnostics(tmp_path, "NPO", {"relearn": {"skipped": "needs 2 forget people", "key": "k"}})
    files = write_report(tmp_path, "GD", results(0.35))  # a later plain write keeps every diagnostic
    assert list(load_results(tmp_path)) == ["Vanilla", "GA", "NPO", "VL-Eraser", "GD"]
    diagnostics = load_diagnostics(tmp_path)
    assert set(diagnostics["GA"]) == {"cost", "reload", "quantize", "relearn"}
    assert cost_ratios(diagnostics) == {"GA": 2.0, "NPO": 1.0, "VL-Eraser": None}
    data = json.loads(files["results"].read_text())
    md = files["markdown"].read_text()
    assert md == render_markdown(data["methods"], data["meta"], data["diagnostics"])
    assert "| Method | Forget: Class. acc %" in md  # the main table is still there
    assert "## Diagnostic: vanilla modules reloaded (forget set)" in md
    assert "| Method | Metric | Unlearned | + vanilla projector | Recovery | + vanilla vision | Recovery |" in md
    assert "| GA | Class. acc % | 30.0 [20.0, 40.0] | 45.0 [35.0, 55.0] | +15.0 | 31.0 [21.0, 41.0] | +1.0 |" in md
    assert "| Method | Set | Metric | Unlearned | int8 | Δ | 4-bit | Δ |" in md
    assert "| GA | Forget | Gen. ROUGE-L | 0.300 [0.200, 0.400] | 0.300 [0.200, 0.400] | +0.000 | " \
           "0.500 [0.400, 0.600] | +0.200 |" in md
    assert "| Method | Metric | A (trained on): unlearned | A: relearned | A: recovery | B (held out): unlearned |" in md
    assert "halves A (p1) and B (p0)" in md and "| +60.0 |" in md and "| +25.0 |" in md
    assert "Not run for NPO (needs 2 forget people)." in md and "| NPO | Class. acc %" not in md
    assert "| Method | Wall time (s) | × NPO (same run) | Parts (s) |" in md
    assert "| GA | 20.0 | 2.00 | train 15.0 |" in md and "| NPO | 10.0 | 1.00 | – |" in md
    assert "| VL-Eraser | 9.0 | – | – |" in md
    assert "at a time" not in md
    files = write_report(tmp_path, "KL", results(0.3), diagnostics={"cost": {"run": "r1", "wall_seconds": 12.0,
                                                                              "concurrent_workers": 2, "parts": {}}})
    assert "ran 2 at a time on worker processes sharing the cores" in files["markdown"].read_text()
    # the at-a-glance summary: one row per method that ran a diagnostic, forget cloze values side by side
    assert "| Method | Forget Cloze acc %: unlearned | + vanilla projector | + vanilla vision | int8 | 4-bit | " \
           "Relearn A: before → after | Relearn B: before → after |" in md
    assert "| GA | 30.0 | 45.0 | 31.0 | 30.0 | 50.0 | 30.0 → 90.0 | 25.0 → 50.0 |" in md
    assert "| NPO | –" not in md  # its only diagnostic was skipped
    diagnostics_part = md[md.index("## Diagnostics and attacks at a glance"):]
    assert diagnostics_part.count("### Visual-QA") == 4 and diagnostics_part.count("### Textual-QA") == 4  # summary + one per diagnostic


def test_report_refuses_malformed_diagnostics(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "methods": {}, "diagnostics": {"GA": 3}}))
    with pytest.raises(ReportError, match="diagnostics"):
        load_diagnostics(tmp_path)


def test_diagnostics_settings_name_the_field():
    assert dg.diagnostics_settings() == dg.DIAGNOSTICS_DEFAULTS and all(dg.DIAGNOSTICS_DEFAULTS[k] for k in dg.KINDS)
    assert dg.diagnostics_settings({"relearn": False}, {"quantize_bits": [8]})["quantize_bits"] == (8,)
    for bad, field in (({"relearn_stpes": 3}, "c.diagnostics.relearn_stpes"), ({"reload": "yes"}, "c.diagnostics.reload"),
                       ({"quantize_bits": (3,)}, "c.diagnostics.quantize_bits"),
                       ({"relearn_steps": 0}, "c.diagnostics.relearn_steps"),
                       ({"relearn_learning_rate": -1.0}, "c.diagnostics.relearn_learning_rate"),
                       ({"relearn_trainable": "(llm"}, "c.diagnostics.relearn_trainable")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            dg.diagnostics_settings(bad)


def test_demo_flags_reach_run_experiment(monkeypatch, tmp_path):
    from vleraser_jax.experiment import runner as run

    parse = cli.build_parser().parse_args
    assert cli.demo_diagnostics(parse(["demo"])) is None
    assert cli.demo_diagnostics(parse(["demo", "--no-diagnostics"])) == {k: False for k in dg.KINDS}
    assert cli.demo_diagnostics(parse(["demo", "--diagnostics", "relearn"])) == {
        "reload": False, "quantize": False, "relearn": True}
    with pytest.raises(SystemExit):
        parse(["demo", "--no-diagnostics", "--diagnostics", "reload"])
    seen = {}

    def fake_run_experiment(c, methods, *, diagnostics=None, workers=1, log=print):
        seen.update(methods=methods, diagnostics=diagnostics, workers=workers)
        (tmp_path / "report.md").write_text("# report\n")
        return tmp_path

    monkeypatch.setattr(run, "run_experiment", fake_run_experiment)
    assert cli.main(["demo", "--method", "npo", "--no-diagnostics", "--workers", "3",
                     f"--config.work_dir={tmp_path}"]) == 0
    assert seen == {"methods": ["npo"], "diagnostics": {k: False for k in dg.KINDS}, "workers": 3}
    # auto: 2 on this CPU host when it has 2 cores, else 1
    assert cli.main(["demo", "--method", "npo", f"--config.work_dir={tmp_path}"]) == 0
    assert seen["workers"] == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)
    assert cli.main(["unlearn", "--config", "configs/tiny_llava.py", "--method", "npo", "--workers", "1",
                     f"--config.work_dir={tmp_path}"]) == 0
    assert seen["workers"] == 1
    with pytest.raises(SystemExit, match="--workers 'two'"):
        cli.main(["demo", "--workers", "two", f"--config.work_dir={tmp_path}"])


# ------------------------------------------------------------------ smoke: run_experiment with diagnostics


def test_run_experiment_runs_caches_and_reports_the_diagnostics(monkeypatch, tmp_path, full_checkpoint, bench):
    from vleraser_jax.data import mllmu
    from vleraser_jax.experiment import pipeline, runner as run
    from vleraser_jax.experiment.methods import MethodRun

    seen = {"vanilla": None, "evaluated": []}

    def fake_run_method(c, method, model, params, processor, bench, *, log=print, run_dir=None):
        # an "unlearning" that only damps the projector: what the reload diagnostic is built to catch
        seen["vanilla"] = params
        unlearned = {**params, "projector": jax.tree_util.tree_map(lambda x: 0.5 * x, params["projector"])}
        return MethodRun({"npo": "NPO", "ga": "GA"}[method], unlearned, {"train_seconds": 0.1, "total_seconds": 0.2})

    evaluate = dg._evaluate

    def spy(model, params, processor, bench, ecfg, sets):  # which trees the diagnostics score
        seen["evaluated"].append((tuple(sets), params))
        return evaluate(model, params, processor, bench, ecfg, sets)

    monkeypatch.setattr(pipeline, "run_method", fake_run_method)
    monkeypatch.setattr(dg, "_evaluate", spy)
    monkeypatch.setattr(pipeline, "run_stage", lambda c, stage, log=print: full_checkpoint)
    monkeypatch.setattr(pipeline, "data_root", lambda c: tmp_path / "data")
    monkeypatch.setattr(pipeline, "prepare_data", lambda c, log=print: (tmp_path / "data", full_checkpoint))
    monkeypatch.setattr(mllmu, "load_benchmark", lambda root, ratio: bench)
    c = ml_collections.ConfigDict({
        "name": "tiny", "seed": 0, "work_dir": str(tmp_path), "data": {"forget_ratio": 5},
        "model": {"dtype": "float32", "attention": "xla"},
        "eval": {"batch_size": 8, "max_people": 0, "few_shot_people": 0, "max_new_tokens": 4},
        "diagnostics": {"relearn_steps": 2, "relearn_batch_size": 2},
    })
    logs = []
    report_dir = run.run_experiment(c, ["npo", "ga"], log=logs.append)
    data = json.loads((report_dir / "results.json").read_text())
    assert list(data["methods"]) == ["Vanilla", "NPO", "GA"]
    # per method: reload (the projector; the vision tower is Vanilla's already, so reloading it gives back the
    # unlearned model and is not scored again), quantize (int8, int4), relearn (A, B before; A, B after)
    assert [sets for sets, _ in seen["evaluated"]] == 2 * ([("forget",)] + [("forget", "retain")] * 2
                                                           + [("forget",)] * 4)
    vanilla = flat(seen["vanilla"])
    with_projector = flat(seen["evaluated"][0][1])
    for k in vanilla:  # the fake unlearning changed only the projector
        assert with_projector[k] is vanilla[k], k  # ... which the vanilla projector undoes
    for title in ("NPO", "GA"):
        d = data["diagnostics"][title]
        assert set(d) == {"cost", "reload", "quantize", "relearn"}
        assert set(d["reload"]["projector"]) == {"forget"} and set(d["quantize"]["int4"]) == {"forget", "retain"}
        assert d["reload"]["unlearned"] == {"forget": data["methods"][title]["forget"]}
        assert d["reload"]["unchanged"] == ["vision"] and d["reload"]["vision"] == d["reload"]["unlearned"]
        assert all(v == 0.0 for m in ("visual", "textual")
                   for v in d["reload"]["recovery"]["vision"]["forget"][m].values())
        # text-only questions never see the projector or the vision tower
        assert all(v == 0.0 for w in dg.MODULES for v in d["reload"]["recovery"][w]["forget"]["textual"].values())
        assert d["relearn"]["people"] == {"A": ["p1"], "B": ["p0"]} or d["relearn"]["people"] == {"A": ["p0"], "B": ["p1"]}
        assert d["relearn"]["settings"]["max_length"] == 128 and d["relearn"]["settings"]["steps"] == 2
    assert data["diagnostics"]["NPO"]["cost"]["run"] == data["diagnostics"]["GA"]["cost"]["run"]
    md = (report_dir / "report.md").read_text()
    assert "## Attack: relearning" in md and "| NPO | " in md and "| GA | " in md
    assert f"| GA | {data['diagnostics']['GA']['cost']['wall_seconds']:.1f} | " in md

    # a second run reuses every cached diagnostic; GA's cost now comes from another run than NPO's
    logs.clear()
    run.run_experiment(c, ["ga"], log=logs.append)
    assert sum("already in the report, skipped" in line for line in logs) == 3
    again = json.loads((report_dir / "results.json").read_text())["diagnostics"]
    assert again["GA"]["reload"] == data["diagnostics"]["GA"]["reload"]
    assert cost_ratios(again)["GA"] is None
    # a changed setting invalidates only that diagnostic
    c.diagnostics.relearn_steps = 1
    logs.clear()
    run.run_experiment(c, ["ga"], diagnostics={"reload": False, "quantize": False}, log=logs.append)
    assert any("GA: relearn diagnostic" in line for line in logs)
    assert load_diagnostics(report_dir)["GA"]["relearn"]["settings"]["steps"] == 1
