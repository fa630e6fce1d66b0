"""Scale-out: mesh and rules, every parameter covered, remat, and sharded == unsharded on 8 simulated devices.

The 8-device checks run in one subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=8) so this
session keeps its single device; the subprocess is this file run as a script, and reports one number per
(check, mesh) that the tests below hold to a stated tolerance.

Tolerances (f32 everywhere): sharded vs unsharded relative error max|a - b| / max|b| <= 1e-5 (sharding
changes only the order of summation across devices); greedy tokens and loaded checkpoints exactly equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vleraser_jax import parallel as par
from vleraser_jax.checkpoints import expected_shapes
from vleraser_jax.models.configs import (CLIPVisionConfig, LlavaConfig, Qwen2VLConfig, Qwen2VLVisionConfig,
                                         TextConfig)
from vleraser_jax.models.llava import LlavaForConditionalGeneration
from vleraser_jax.models.qwen2_vl import Qwen2VLForConditionalGeneration

MESHES = ("8x1x1", "2x2x2", "1x4x2")
QWEN_GENERATE_MESH = "2x2x2"
RTOL = 1e-5  # f32, relative to the largest reference magnitude
LLAVA_IMAGE, QWEN_IMAGE = 120, 121


def tiny_llava(layers: int = 2, bias: bool = False, **changes) -> LlavaConfig:
    text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      qkv_bias=bias, o_bias=bias, mlp_bias=bias, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                              image_size=28, patch_size=7)
    return LlavaConfig(vision=vision, text=text, image_token_index=LLAVA_IMAGE, image_seq_length=16,
                       vision_feature_layer=-1 if layers == 1 else -2, **changes)


def tiny_qwen(layers: int = 2, **changes) -> Qwen2VLConfig:
    text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      qkv_bias=True, model_type="qwen2_vl_text", pad_token_id=0,
                      rope=(("mrope_section", (2, 3, 3)), ("rope_theta", 10000.0), ("rope_type", "default")))
    vision = Qwen2VLVisionConfig(depth=layers, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4)
    return Qwen2VLConfig(vision=vision, text=text, image_token_id=QWEN_IMAGE, **changes)


# ------------------------------------------------------------------ rules (one device)


@pytest.mark.parametrize("model", [
    LlavaForConditionalGeneration(tiny_llava()),
    LlavaForConditionalGeneration(tiny_llava(bias=True)),
    LlavaForConditionalGeneration(tiny_llava().replace(text=TextConfig(**{
        **tiny_llava().text.__dict__, "tie_word_embeddings": True}))),
    Qwen2VLForConditionalGeneration(tiny_qwen()),
], ids=["llava", "llava-biases", "llava-tied", "qwen2-vl"])
def test_every_parameter_gets_a_rule(model):
    mesh = jax.sharding.AbstractMesh((1, 4, 2), par.MESH_AXES)
    sharder = par.Sharder(mesh)
    shapes = expected_shapes(model)
    for path, (shape, _) in shapes.items():
        logical = par.logical_axes(path, len(shape))  # raises if no rule covers it
        assert len(logical) == len(shape)
        sharder.spec(logical, shape)  # every logical name has a mesh rule
    # LoRA factors and projectors inherit their kernel's axes
    assert par.logical_axes("lora/llm/layers_0/mlp/down_proj/a", 2) == ("mlp", "lora_rank")
    assert par.logical_axes("lora/llm/layers_0/mlp/down_proj/b", 2) == ("lora_rank", "embed")
    assert par.logical_axes("vacuum/llm/layers_3/mlp/down_proj/basis", 2) == ("mlp", "basis")
    assert par.logical_axes("opt_state/0/mu/llm/layers_0/self_attn/q_proj/kernel", 2) == ("embed", "heads")


def test_unknown_parameter_and_logical_name_are_errors():
    with pytest.raises(par.ShardingRuleError, match="no sharding rule covers 'llm/new_thing/kernel'"):
        par.logical_axes("llm/new_thing/kernel", 2)
    with pytest.raises(par.ShardingRuleError, match="rank 3"):
        par.logical_axes("llm/layers_0/mlp/up_proj/kernel", 3)
    sharder = par.Sharder(jax.sharding.AbstractMesh((1, 1, 2), par.MESH_AXES), rules=(("embed", "fsdp"),))
    with pytest.raises(par.ShardingRuleError, match="'mlp' has no mesh rule"):
        sharder.spec(("embed", "mlp"), (8, 8))


def test_mesh_specs_and_divisibility():
    assert par.mesh_shape("1x4x2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert par.mesh_shape("fsdp=-1,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert par.mesh_shape(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert par.mesh_shape({"data": 2, "fsdp": -1, "tensor": 1}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad, n in (("2x2x2", 4), ("3x-1x1", 8), ("-1x-1x1", 8), ("pipe=2", 2), ("2x2", 4)):
        with pytest.raises(ValueError):
            par.mesh_shape(bad, n)
    sharder = par.Sharder(jax.sharding.AbstractMesh((2, 2, 2), par.MESH_AXES))
    P = jax.sharding.PartitionSpec
    assert sharder.spec(("batch", None), (8, 5)) == P(("data", "fsdp"), None)
    assert sharder.spec(("batch", None), (2, 5)) == P("data", None)  # 2 rows: only the leading axis fits
    assert sharder.spec(("vocab", "embed"), (101, 64)) == P(None, "fsdp")  # 101 does not split
    assert sharder.spec(("mlp", "embed"), (11008, 4096)) == P("tensor", "fsdp")


def test_7b_parameters_split_over_every_device_of_the_documented_mesh():
    """On 1x4x2 every large 7B matrix is split 8 ways (no silently replicated weights)."""
    from vleraser_jax.experiment.plan import build_model
    from vleraser_jax.config import load_config

    root = Path(__file__).resolve().parent.parent / "configs"
    sharder = par.Sharder(jax.sharding.AbstractMesh((1, 4, 2), par.MESH_AXES))
    for name in ("llava_1_5_7b.py", "qwen2_vl_7b.py"):
        model = build_model(load_config(root / name), attention="xla")
        for path, (shape, _) in expected_shapes(model).items():
            spec = sharder.spec(par.logical_axes(path, len(shape)), shape)
            ways = 1
            for axes in spec:
                for a in (axes,) if isinstance(axes, str) else (axes or ()):
                    ways *= {"data": 1, "fsdp": 4, "tensor": 2}[a]
            if np.prod(shape) >= 4 * 2**20:  # every matrix of 4M+ entries (the smaller ones hold < 1%)
                assert ways == 8, (name, path, shape, spec)


def test_planner_compiles_the_real_programs_and_judges_the_fit(quick_compiles):
    """`vleraser plan`'s machinery on a tiny architecture (1 device here; the 7B numbers are in the README):
    both programs compile from abstract shapes, bytes and FLOPs grow with the batch, the verdict follows
    the device memory."""
    from vleraser_jax.experiment import plan as pl
    from vleraser_jax.config import load_config

    c = load_config(Path(__file__).resolve().parent.parent / "configs" / "llava_1_5_7b.py",
                    ["--config.model.attention=xla", "--config.vl_eraser.max_length=32", "--config.vl_eraser.rank=4",
                     "--config.plan.retained_rank=8", "--config.plan.image_size=28", "--config.plan.prompt_length=24",
                     "--config.plan.max_new_tokens=3", "--config.plan.generate_batch=2"])
    c.model.hf_config = tiny_llava(layers=1).to_hf_config()
    plans, info = pl.plan(c, "1x1x1")
    assert [p.program for p in plans] == ["VL-Eraser stage-1 step", "generation"]
    model = pl.build_model(c)
    assert info["parameters"] == sum(int(np.prod(s)) for s, _ in expected_shapes(model).values())
    frozen_bytes = jnp.dtype(pl.frozen_dtype(c) or "float32").itemsize  # the 7B config holds frozen weights in bf16
    assert frozen_bytes == 2
    for p in plans:
        assert p.argument_bytes >= frozen_bytes * info["parameters"] and p.flops > 0 and p.temp_bytes > 0
        assert p.peak_bytes == p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes
    distill = plans[0]
    assert distill.alias_bytes > 0  # the donated train state is updated in place
    sharder = par.Sharder(par.make_mesh("1x1x1"))
    bigger = pl._analyse("x", "", pl.distill_program(c, model, sharder, batch=8)[0])
    assert bigger.flops > 1.5 * distill.flops and bigger.temp_bytes > distill.temp_bytes
    text = pl.format_plan(c, plans, info, device_memory_gb=distill.peak_bytes / 1e9 * 1.01)
    assert text.splitlines()[4].endswith("  fits")
    text = pl.format_plan(c, plans, info, device_memory_gb=distill.peak_bytes / 1e9 * 0.99)
    assert text.splitlines()[4].endswith("DOES NOT FIT")


@pytest.fixture
def quick_compiles():
    """Three compiles dominate the remat test: skip XLA's backend optimisations (numerics unchanged)."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_remat_keeps_parameters_and_gradients(quick_compiles):
    from vleraser_jax.checkpoints import init_params
    from vleraser_jax.unlearn.trainer import causal_lm_loss

    base = LlavaForConditionalGeneration(tiny_llava(layers=1))
    params = init_params(base, jax.random.PRNGKey(0))
    batch = llava_batch(np.random.default_rng(0), 2)

    def grads(model):
        loss = lambda p: causal_lm_loss(model.apply({"params": p}, **{k: v for k, v in batch.items() if k != "labels"}).logits,
                                        batch["labels"])
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref = grads(base)
    for policy in ("full", "dots"):
        model = LlavaForConditionalGeneration(tiny_llava(layers=1, remat=policy))
        assert expected_shapes(model) == expected_shapes(base)
        loss, g = grads(model)
        assert abs(float(loss) - float(ref_loss)) <= RTOL * abs(float(ref_loss))
        # the gradient as one vector (key biases have a mathematically zero, numerically ~1e-9 gradient)
        scale = max(float(jnp.abs(b).max()) for b in jax.tree_util.tree_leaves(ref))
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
            assert float(jnp.abs(a - b).max()) <= RTOL * scale


def test_initialize_distributed_only_when_launched_that_way():
    assert par.initialize_distributed({}) is False
    assert par.initialize_distributed({"VLERASER_DISTRIBUTED": "0"}) is False


@pytest.mark.slow
def test_sharded_training_loop_resumes_exactly_and_fisher_matches(tmp_path):
    out = tmp_path / "loop.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, str(out), "loop"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert r["first_stopped"] == 2 and r["resumed_from"] == 2
    assert r["loop"] <= RTOL and r["loss_history"] <= RTOL
    assert r["lora_a_sharding"] == "P('tensor', None)"  # restored from orbax onto its shards
    assert r["fisher"] <= RTOL and r["fisher_sharding"] == "P('fsdp', 'tensor')"


@pytest.mark.slow
def test_two_processes_form_one_job():
    """launch/local.sh with NPROC=2: two processes of 4 CPU devices join through jax.distributed (gloo) and run
    one sharded forward on the global 2x2x2 mesh; both see the same result as a single process."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(NPROC="2", CPU_DEVICES="4")
    proc = subprocess.run(["bash", str(root / "launch" / "local.sh"), sys.executable, "-m", "vleraser_jax.parallel",
                           "--mesh", "2x2x2"], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["process"] for r in reports) == [0, 1]
    assert all(r["devices"] == 8 and r["local_devices"] == 4 and r["processes"] == 2 for r in reports)
    single = par.selfcheck()  # this process: one device, unsharded
    for r in reports:
        assert abs(r["checksum"] - single["checksum"]) <= RTOL * abs(single["checksum"])


# ------------------------------------------------------------------ batches shared with the subprocess


def llava_batch(rng, b: int, t: int = 24):
    ids = rng.integers(3, 110, (b, t)).astype(np.int32)
    ids[:, 2:18] = LLAVA_IMAGE  # 16 image tokens per row
    mask = np.ones_like(ids)
    mask[0, :1] = 0  # one left-padded row
    labels = np.where(np.arange(t) >= 18, ids, -100).astype(np.int32)
    pixels = rng.standard_normal((b, 3, 28, 28)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def qwen_batch(rng, b: int, t: int = 12):
    """One 4x4-patch image (4 merged tokens) per row."""
    ids = rng.integers(3, 110, (b, t)).astype(np.int32)
    ids[:, 2:6] = QWEN_IMAGE
    mask = np.ones_like(ids)
    pixels = rng.standard_normal((b * 16, 3 * 2 * 4 * 4)).astype(np.float32)
    grid = np.tile(np.array([[1, 4, 4]], np.int32), (b, 1))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid}


# ------------------------------------------------------------------ 8 simulated devices (subprocess)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "results.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


NUMERIC_CHECKS = ("forward_llava", "forward_qwen", "vl_eraser_step", "npo_step", "moments", "projector", "deletion")


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("check", NUMERIC_CHECKS)
def test_sharded_equals_unsharded(eight_devices, check, mesh):
    assert eight_devices[check][mesh] <= RTOL, eight_devices[check]


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_generation_gives_the_same_tokens(eight_devices, mesh):
    assert eight_devices["generate_llava"][mesh] is True


def test_sharded_qwen2_vl_generation_gives_the_same_tokens(eight_devices):
    """M-RoPE decoding on the mesh that uses all three axes (one mesh only: each decode program costs seconds
    to compile; the forward pass of Qwen2-VL is checked on every mesh)."""
    assert eight_devices["generate_qwen"] == {QWEN_GENERATE_MESH: True}


LAYOUT = {  # what the default rules give on each mesh (tiny sizes all divide these meshes)
    "8x1x1": {"down_proj": "P(None, None)", "lora_mu_a": "P(None, None)", "logits": "P('data', None, None)"},
    "2x2x2": {"down_proj": "P('tensor', 'fsdp')", "lora_mu_a": "P('tensor', None)",
              "logits": "P(('data', 'fsdp'), None, 'tensor')"},
    "1x4x2": {"down_proj": "P('tensor', 'fsdp')", "lora_mu_a": "P('tensor', None)",
              "logits": "P('fsdp', None, 'tensor')"},
}


@pytest.mark.parametrize("mesh", MESHES)
def test_arrays_are_really_sharded(eight_devices, mesh):
    """The equality checks are not vacuous: weights, optimizer moments and outputs are split over the mesh."""
    assert eight_devices["layout"][mesh] == LAYOUT[mesh]


@pytest.mark.parametrize("mesh", MESHES)
def test_init_under_jit_and_hf_shards_read_straight_into_devices(eight_devices, mesh):
    load = eight_devices["load"][mesh]
    assert load["init_equal"], "init under jit with out_shardings gives other values than unsharded init"
    assert load["llava_equal"] and load["qwen_equal"], "sharded load differs from checkpoints.load_pretrained"
    # every read is exactly one device's shard of its tensor (never the whole of a sharded tensor) ...
    assert load["reads_are_single_shards"]
    # ... each region is read once (devices holding the same replica share it): bytes read == bytes on disk
    assert load["bytes_read"] == load["bytes_on_disk"]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _tree_rel(a, b) -> float:
    """Worst leaf; a dict of scalar metrics counts as one vector (NPO's log-ratio is a difference of two
    NLLs, so its error is judged at their scale, not at its own)."""
    if isinstance(b, dict) and b and all(getattr(v, "shape", None) == () for v in b.values()):
        assert sorted(a) == sorted(b)
        return _rel([a[k] for k in sorted(b)], [b[k] for k in sorted(b)])
    if isinstance(b, (tuple, list)) and not hasattr(b, "_fields"):
        return max(_tree_rel(x, y) for x, y in zip(a, b))
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max((_rel(x, y) for x, y in zip(la, lb)), default=0.0)


def _child(out_path: str) -> None:
    """Runs with 8 CPU devices: every check, unsharded reference first, then each mesh."""
    import tempfile

    from flax import traverse_util

    from vleraser_jax.generate import generate
    from vleraser_jax.checkpoints import load_pretrained, load_pretrained_sharded, save_pretrained
    from vleraser_jax.unlearn import baselines as bl
    from vleraser_jax.unlearn import lora as lora_lib
    from vleraser_jax.unlearn import trainer as tr
    from vleraser_jax.unlearn import vacuum
    from vleraser_jax.unlearn import vl_eraser as vle

    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates; numerics unchanged
    rng = np.random.default_rng(0)
    # one block per tower: compiles dominate the runtime; every parameter kind is still there
    llava = LlavaForConditionalGeneration(tiny_llava(layers=1))
    qwen = Qwen2VLForConditionalGeneration(tiny_qwen(layers=1))
    jit_init = lambda model, key: jax.jit(lambda k: model.init(k, **model.dummy_inputs())["params"])(key)
    lp, qp = jit_init(llava, jax.random.PRNGKey(0)), jit_init(qwen, jax.random.PRNGKey(1))
    lb, qb = llava_batch(rng, 8), qwen_batch(rng, 8)
    strip = lambda b: {k: v for k, v in b.items() if k != "labels"}
    results: dict = {k: {} for k in NUMERIC_CHECKS + ("generate_llava", "generate_qwen", "layout", "load")}

    # --- unsharded references (the existing single-device code paths)
    ref = {
        "forward_llava": jax.jit(lambda p, b: llava.apply({"params": p}, **b).logits)(lp, strip(lb)),
        "forward_qwen": jax.jit(lambda p, b: qwen.apply({"params": p}, **b).logits)(qp, qb),
    }
    gen_args = dict(max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    ref["generate_llava"] = np.asarray(generate(llava, lp, lb["input_ids"], lb["attention_mask"],
                                                lb["pixel_values"], **gen_args).tokens)
    ref["generate_qwen"] = np.asarray(generate(qwen, qp, qb["input_ids"], qb["attention_mask"], qb["pixel_values"],
                                               image_grid_thw=qb["image_grid_thw"], **gen_args).tokens)
    # two batches (the on-device accumulation runs) of 4 images: 8 retained directions, as well separated
    # from the null space as with one batch of 8 (more images give smaller retained eigenvalues, and the
    # eigenvectors' sensitivity to rounding grows as 1 / eigengap)
    retain = [strip(llava_batch(rng, 4)) for _ in range(2)]
    moments, _ = vacuum.collect_moments(llava, lp, retain, pooling="mean", progress=False)
    ref["moments"] = moments
    projectors, _ = vacuum.build_vacuum_projectors(moments, threshold=1e-6, mode="relative")
    dense = lambda pr: {k: np.eye(v["basis"].shape[0]) - np.asarray(v["basis"], np.float64) @ np.asarray(v["basis"], np.float64).T
                        for k, v in lora_lib.entries(pr).items()}
    ref["projector"] = dense(projectors)

    vcfg = vle.VLEraserConfig(rank=4, lora_alpha=8.0, distill_tokens="answer")
    lora = lora_lib.init(lp, vcfg.rank, vcfg.lora_alpha, jax.random.PRNGKey(2), b_std=0.1)
    trainable, scales = lora_lib.split_trainable(lora)
    frozen = {"params": lp, "lora_scales": scales, "vacuum": projectors}
    tx = tr.make_optimizer(tr.TrainConfig(total_steps=2, learning_rate=1e-2))
    vle_loss = vle.distillation_loss_fn(llava, vcfg)

    def one_step(loss_fn, trainable, frozen, batch, sharding=None):
        state = tr.init_state(trainable, tx, 0, sharding)
        step = tr.make_train_step(loss_fn, tx, sharding)
        state, metrics = step(state, frozen if sharding is None else sharding.put(frozen, sharding.tree(frozen)), batch)
        return state, metrics

    state, metrics = one_step(vle_loss, trainable, frozen, lb)
    ref["vl_eraser_step"] = (state.trainable, state.opt_state, metrics)
    ncfg = bl.BaselineConfig(method="npo", lora_rank=4, lora_alpha=8.0, lora_a_std=0.3)
    adapter, n_train, n_frozen = bl.prepare(llava, lp, ncfg, jax.random.PRNGKey(3))
    n_train = jax.tree_util.tree_map(lambda x: x + 0.05, n_train)  # b != 0: gradients reach a and b
    npo_loss = bl.baseline_loss_fn(adapter, ncfg)
    state, metrics = one_step(npo_loss, n_train, n_frozen, {"forget": lb})
    ref["npo_step"] = (state.trainable, state.opt_state, metrics)
    ref["deletion"] = jax.jit(lambda p, l, pr: vle.delete(p, l, pr, strength=0.7))(lp, lora, projectors)

    tmp = Path(tempfile.mkdtemp())
    save_pretrained(lp, llava.config, tmp / "llava", max_shard_size="100KB")  # several shard files
    save_pretrained(qp, qwen.config, tmp / "qwen")
    _, lp_disk, _ = load_pretrained(tmp / "llava")
    _, qp_disk, _ = load_pretrained(tmp / "qwen")
    disk_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(lp_disk))  # f32 on disk too

    for mesh_spec in MESHES:
        sh = par.Sharder(par.make_mesh(mesh_spec))
        logits = par.make_forward(llava, sh)(lp, lb)
        results["forward_llava"][mesh_spec] = _rel(logits, ref["forward_llava"])
        results["forward_qwen"][mesh_spec] = _rel(par.make_forward(qwen, sh)(qp, qb), ref["forward_qwen"])
        g = generate(llava, lp, lb["input_ids"], lb["attention_mask"], lb["pixel_values"], sharding=sh, **gen_args)
        results["generate_llava"][mesh_spec] = bool((np.asarray(g.tokens) == ref["generate_llava"]).all())
        if mesh_spec == QWEN_GENERATE_MESH:
            g = generate(qwen, qp, qb["input_ids"], qb["attention_mask"], qb["pixel_values"],
                         image_grid_thw=qb["image_grid_thw"], sharding=sh, **gen_args)
            results["generate_qwen"][mesh_spec] = bool((np.asarray(g.tokens) == ref["generate_qwen"]).all())

        m, _ = vacuum.collect_moments(llava, lp, retain, pooling="mean", progress=False, sharding=sh)
        results["moments"][mesh_spec] = max(_rel(m[k], ref["moments"][k]) for k in ref["moments"])
        pr, _ = vacuum.build_vacuum_projectors(m, threshold=1e-6, mode="relative")
        d = dense(pr)
        results["projector"][mesh_spec] = max(_rel(d[k], ref["projector"][k]) for k in d)

        state, metrics = one_step(vle_loss, trainable, frozen, lb, sh)
        results["vl_eraser_step"][mesh_spec] = _tree_rel((state.trainable, state.opt_state, metrics),
                                                         ref["vl_eraser_step"])
        mu_a = _leaf(state.opt_state, "mu/llm/layers_0/mlp/down_proj/a")
        state, metrics = one_step(npo_loss, n_train, n_frozen, {"forget": lb}, sh)
        results["npo_step"][mesh_spec] = _tree_rel((state.trainable, state.opt_state, metrics), ref["npo_step"])
        deleted = vle.delete(lp, lora, projectors, strength=0.7, sharding=sh)
        results["deletion"][mesh_spec] = _tree_rel(deleted, ref["deletion"])

        kernel = deleted["llm"]["layers_0"]["mlp"]["down_proj"]["kernel"]
        results["layout"][mesh_spec] = {"down_proj": repr(kernel.sharding.spec), "lora_mu_a": repr(mu_a.sharding.spec),
                                        "logits": repr(logits.sharding.spec)}

        stats: dict = {}
        _, sharded_lp, _ = load_pretrained_sharded(tmp / "llava", sh, stats=stats)
        _, sharded_qp, _ = load_pretrained_sharded(tmp / "qwen", sh)
        shapes = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(lp).items()}
        init = par.init_params(llava, jax.random.PRNGKey(0), sh)
        results["load"][mesh_spec] = {
            "init_equal": _tree_rel(init, lp) == 0.0,
            "llava_equal": _tree_rel(sharded_lp, lp_disk) == 0.0,
            "qwen_equal": _tree_rel(sharded_qp, qp_disk) == 0.0,
            "reads_are_single_shards": all(size * _ways(sh, path, shapes[path]) == full
                                           for path, size, full in stats["reads"]),
            "bytes_read": stats["bytes_read"], "bytes_on_disk": disk_bytes,
        }
    Path(out_path).write_text(json.dumps(results, indent=1))


def _ways(sh, path, shape) -> int:
    """Into how many distinct shards the rules split the parameter at `path`."""
    spec = sh.spec(par.logical_axes(path, len(shape)), shape)
    return int(np.prod([sh.mesh.shape[a] for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes)]))


def _leaf(tree, suffix: str):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if par.path_string(path).endswith(suffix):
            return x
    raise KeyError(suffix)


def _child_loop(out_path: str) -> None:
    """8 devices, mesh 2x2x2: `trainer.train` sharded (orbax checkpoint, kill after step 2, resume) ends where
    the unsharded loop does; MMUnlearner's Fisher statistics sharded == unsharded."""
    import dataclasses
    import tempfile

    from vleraser_jax.unlearn import baselines as bl
    from vleraser_jax.unlearn import lora as lora_lib
    from vleraser_jax.unlearn import trainer as tr
    from vleraser_jax.unlearn import vl_eraser as vle

    jax.config.update("jax_disable_most_optimizations", True)
    llava = LlavaForConditionalGeneration(tiny_llava(layers=1))
    lp = jax.jit(lambda k: llava.init(k, **llava.dummy_inputs())["params"])(jax.random.PRNGKey(0))
    batches = [llava_batch(np.random.default_rng(i), 8) for i in range(3)]
    vcfg = vle.VLEraserConfig(rank=4, lora_alpha=8.0, vacuum=False, distill_tokens="answer")
    trainable, scales = lora_lib.split_trainable(lora_lib.init(lp, 4, 8.0, jax.random.PRNGKey(2), b_std=0.1))
    frozen = {"params": lp, "lora_scales": scales, "vacuum": None}
    cfg = tr.TrainConfig(total_steps=3, learning_rate=1e-2, progress=False, log_every=1)
    loss_fn = vle.distillation_loss_fn(llava, vcfg)
    ref = tr.train(loss_fn, trainable, frozen, lambda step: batches[step], cfg)
    sh = par.Sharder(par.make_mesh("2x2x2"))
    ckpt = dataclasses.replace(cfg, checkpoint_dir=tempfile.mkdtemp())
    first = tr.train(loss_fn, trainable, frozen, lambda step: batches[step], ckpt, stop_after=2, sharding=sh)
    second = tr.train(loss_fn, trainable, frozen, lambda step: batches[step], ckpt, sharding=sh)
    a = second.trainable["llm"]["layers_0"]["mlp"]["down_proj"]["a"]
    sel, _ = bl.select_modules(lp, lora_lib.LM_LINEARS)
    fisher_batches = [[{k: v for k, v in b.items()} for b in batches[:2]]]
    f_ref = bl.fisher_diagonals(llava, lp, fisher_batches)[0]
    f_sh = bl.fisher_diagonals(llava, lp, fisher_batches, sharding=sh)[0]
    Path(out_path).write_text(json.dumps({
        "resumed_from": second.resumed_from, "first_stopped": first.history[-1]["step"],
        "loop": _tree_rel(second.trainable, ref.trainable),
        "loss_history": _rel([h["loss"] for h in second.history], [h["loss"] for h in ref.history[-1:]]),
        "lora_a_sharding": repr(a.sharding.spec),
        "fisher": _tree_rel(f_sh, f_ref),
        "fisher_sharding": repr(_leaf(f_sh, "mlp/up_proj/kernel").sharding.spec),
    }))


if __name__ == "__main__":
    (_child_loop if sys.argv[2:] == ["loop"] else _child)(sys.argv[1])
