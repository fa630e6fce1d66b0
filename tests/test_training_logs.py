"""Training logs people can read: a method run's JSONL in its run directory, the same scalars as TensorBoard events
(read back with tensorboardX's own protobufs), `vleraser plot` drawing them to PNG, and clear errors."""

from __future__ import annotations

import io
import json
import struct
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vleraser_jax import cli
from vleraser_jax.checkpoints import load_pretrained
from vleraser_jax.eval.curves import find_train_log, plot_training_curves, read_train_log
from vleraser_jax.eval.report import ReportError
from vleraser_jax.models.configs import ConfigError
from vleraser_jax.train.workspace import tensorboard_on
from vleraser_jax.unlearn.trainer import LOG_NAME

METRICS = {"step", "lr", "examples_per_s", "loss", "grad_norm"}


pytestmark = pytest.mark.usefixtures("quick_compiles")  # conftest: compiles dominate these runs


def config(tensorboard: bool, steps: int = 6):
    run = {"epochs": None, "steps": steps, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 2, "max_length": 64}
    return ml_collections.ConfigDict({"seed": 0, "baselines": {"npo": run}, "log": {"tensorboard": tensorboard}})


@pytest.fixture(scope="module")
def npo_run(tmp_path_factory):
    """A real 6-step NPO run through `run_method`, as `run_experiment` starts it, with TensorBoard on."""
    from conftest import tiny_llava_hf_config, write_full_checkpoint

    from vleraser_jax.data.mllmu import Benchmark, TrainingRow
    from vleraser_jax.experiment.methods import run_method
    from vleraser_jax.processing import load_processor

    root = tmp_path_factory.mktemp("logs")
    ckpt = write_full_checkpoint(root / "ckpt", tiny_llava_hf_config(vision_layers=1, vision_feature_layer=-1),
                                 lm_layers=1)
    model, params, _ = load_pretrained(ckpt)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    forget = tuple(TrainingRow("f1", q, a, buf.getvalue()) for q, a in
                   [("Who is this person?", "This is Mara Quill."), ("What does she do?", "A painter born in Oslo."),
                    ("Where was she born?", "In Oslo."), ("What does the portrait show?", "Red hair.")])
    retain = tuple(TrainingRow("r1", q, a, buf.getvalue()) for q, a in
                   [("Who is this person?", "This is Ivo Brandt."), ("What does he do?", "A baker in Lyon.")])
    bench = Benchmark(root="", forget_ratio=5, forget=(), test=(), retain=(), real=(), forget_train=forget,
                      retain_train=retain, full_train=forget + retain)  # NPO has a retain term (open-unlearning)
    run_dir = root / "runs" / "npo"
    run_dir.mkdir(parents=True)
    (run_dir / LOG_NAME).write_text('{"step": 99, "loss": 5.0}\n')  # a previous run's log: replaced, not appended
    run = run_method(config(True), "npo", model, params, load_processor(ckpt), bench, log=lambda *_: None,
                     run_dir=run_dir)
    return run_dir, run


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the event files in `folder`: TFRecord framing, tensorboardX's Event proto."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list] = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = file.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])  # 8 length + 4 crc, then the record
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_a_method_run_logs_jsonl_and_tensorboard_in_its_run_directory(npo_run):
    run_dir, run = npo_run
    records = read_train_log(run_dir / LOG_NAME)
    assert [r["step"] for r in records] == list(range(1, 7))  # the old run's step 99 is gone
    assert all(METRICS | {"forget_nll"} <= set(r) for r in records)
    assert records == run.info["history"]  # the log is the trainer's history, record for record
    assert records[0]["lr"] < records[1]["lr"]  # the warmup
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert set(scalars) == {f"train/{k}" for k in records[0] if k != "step"}
    for key in ("loss", "lr", "grad_norm", "forget_nll"):
        steps, values = zip(*scalars[f"train/{key}"])
        assert list(steps) == list(range(1, 7))
        np.testing.assert_allclose(values, [r[key] for r in records], rtol=1e-6)  # stored as float32


def test_vleraser_plot_draws_the_curves_of_a_run(npo_run, tmp_path, capsys):
    run_dir, _ = npo_run
    assert cli.main(["plot", str(run_dir)]) == 0
    png = run_dir / "train.png"
    assert f"wrote {png}" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 300
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # drawn, not a blank canvas
    # the same from the log file itself, to a chosen path; a stage's log sits beside its model directory
    stage = tmp_path / "vanilla-abc"
    (tmp_path / f"vanilla-abc.{LOG_NAME}").write_text((run_dir / LOG_NAME).read_text())
    assert find_train_log(stage) == tmp_path / f"vanilla-abc.{LOG_NAME}"
    assert cli.main(["plot", str(run_dir / LOG_NAME), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reading_a_log_resumed_restarted_or_cut_short(tmp_path):
    log = tmp_path / LOG_NAME
    steps = [1, 2, 3, 4, 3, 4, 5, 1, 2]  # killed after 4, resumed from 2; then restarted from scratch
    log.write_text("".join(json.dumps({"step": s, "loss": float(i)}) + "\n" for i, s in enumerate(steps))
                   + '{"step": 3, "lo')  # a writer killed mid-line
    assert [(r["step"], r["loss"]) for r in read_train_log(log)] == [(1, 7.0), (2, 8.0)]
    plot_training_curves(log)  # a log with only loss draws one panel
    log.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ReportError, match=rf"{LOG_NAME}:2: not a metric record"):
        read_train_log(log)
    log.write_text("")
    with pytest.raises(ReportError, match="holds no logged step"):
        read_train_log(log)
    with pytest.raises(ReportError, match=r"no training log \(looked for"):
        find_train_log(tmp_path / "nothing")


def test_tensorboard_on_without_tensorboardx_is_a_clear_error(monkeypatch, tmp_path, capsys):
    assert tensorboard_on(config(False)) is False and tensorboard_on(ml_collections.ConfigDict({})) is False
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed: importing it raises
    with pytest.raises(ConfigError, match=r"tensorboardX is not installed: pip install 'vleraser_jax\[tensorboard\]'"):
        tensorboard_on(config(True))
    from vleraser_jax.experiment import methods

    with pytest.raises(ConfigError, match="log.tensorboard"):
        methods.training_logs(config(True), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
