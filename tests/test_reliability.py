"""Reliability (issue #10): bad checkpoints, training faults, atomic outputs, clear CLI errors, determinism.

Every test injects a fault and checks one of three things: only our error type escapes, with a message that
names the file / tensor / config / ID at fault; nothing half-written is left and the previous output is
byte-identical; or a rerun reproduces the same bytes. (Bad benchmark data: tests/test_data_mllmu.py.
Security and offline mode: tests/test_security.py.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import FAULTS, Killed, problem, train_config

from vleraser_jax import cli, io
from vleraser_jax.checkpoints import export as ckpt_export
from vleraser_jax.checkpoints import safetensors_io
from vleraser_jax.data.mllmu import BenchmarkFormatError
from vleraser_jax.eval.report import ReportError, write_report
from vleraser_jax.checkpoints import CheckpointError, load_pretrained, save_pretrained
from vleraser_jax.models.configs import ConfigError
from vleraser_jax.unlearn import trainer as tr
from vleraser_jax.experiment.artifacts import load_artifacts, save_artifacts

TESTS = Path(__file__).resolve().parent


def flat(params) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes): 'unchanged' means byte-identical."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_header(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_header(file: Path, header: dict, payload: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


@pytest.fixture(scope="module")
def source(tiny_llava_dir):
    """A checkpoint as transformers writes it (no checksums) and its parameters."""
    path, _ = tiny_llava_dir
    _, params, config = load_pretrained(path)
    return path, params, config


@pytest.fixture(scope="module")
def export(source, tmp_path_factory):
    """Our export of the same parameters (per-tensor SHA-256 in the safetensors metadata)."""
    _, params, config = source
    return save_pretrained(params, config, tmp_path_factory.mktemp("export") / "ckpt"), flat(params)


def broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ bad checkpoints


def _lie_shape(h, payload, t):
    h[t]["shape"] = [h[t]["shape"][0] + 1, *h[t]["shape"][1:]]
    return payload


def _overlap(h, payload, t):
    h[t]["data_offsets"] = [o - 4 for o in h[t]["data_offsets"]]
    return payload


def _unknown_dtype(h, payload, t):
    h[t]["dtype"] = "F31"
    return payload


def _int_dtype(h, payload, t):  # same size, so only the dtype says it is wrong
    h[t]["dtype"] = "I32"
    return payload


# name -> (edit(header, payload, middle tensor) -> payload, which tensor the error must name, message fragment)
HEADER_LIES = {
    "shape larger than its bytes": (_lie_shape, "middle", "bytes) but gives it"),
    "spans overlap": (_overlap, "middle", "overlaps the previous tensor"),
    "unknown dtype": (_unknown_dtype, "middle", "unknown dtype 'F31'"),
    "integer dtype for a weight": (_int_dtype, "middle", "has dtype int32; parameters are floating point"),
    "truncated data": (lambda h, p, t: p[:-4], "last", "truncated?"),
}


@pytest.mark.parametrize("case", list(HEADER_LIES))
def test_a_lying_header_is_refused_naming_file_and_tensor(source, tmp_path, case):
    path, _, _ = source
    edit, which, fragment = HEADER_LIES[case]
    ck = broken_copy(path, tmp_path / "ck")
    header, payload = read_header(ck / "model.safetensors")
    order = [k for k in by_offset(header) if header[k]["dtype"] == "F32"]
    middle = order[len(order) // 2]
    payload = edit(header, payload, middle)
    write_header(ck / "model.safetensors", header, payload)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(ck)
    message = str(info.value)
    named = by_offset(header)[-1] if which == "last" else middle
    assert str(ck / "model.safetensors") in message and repr(named) in message and fragment in message, message


@pytest.mark.parametrize("case", ["header length past the end", "header not JSON", "bytes after the last tensor"])
def test_a_broken_file_frame_is_refused_naming_the_file(source, tmp_path, case):
    path, _, _ = source
    ck = broken_copy(path, tmp_path / "ck")
    file = ck / "model.safetensors"
    data = file.read_bytes()
    if case == "header length past the end":
        file.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    elif case == "header not JSON":
        file.write_bytes(data[:8] + b"[" + data[9:])
    else:
        file.write_bytes(data + bytes(16))
    with pytest.raises(CheckpointError, match=str(file)):
        load_pretrained(ck)


def test_config_that_disagrees_with_the_weights_names_tensor_and_config(source, tmp_path):
    path, _, _ = source
    ck = broken_copy(path, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 80
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape .* config \(.*config\.json\) implies"):
        load_pretrained(ck)


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.update(model_type=None), "model_type None is not supported"),
    (lambda c: c.update(model_type=["llava"]), "model_type ['llava'] is not supported"),
    (lambda c: c["text_config"].update(num_attention_heads=5), "describes a model that cannot be built"),
    (lambda c: c["text_config"].update(hidden_size="wide"), "describes a model that cannot be built"),
    (lambda c: c.update(vision_config=None), "not a usable llava config"),
])
def test_a_config_that_cannot_describe_a_model_is_a_config_error(source, tmp_path, edit, fragment):
    path, _, _ = source
    ck = broken_copy(path, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as info:
        load_pretrained(ck)
    assert str(ck / "config.json") in str(info.value) and fragment in str(info.value)
    (ck / "config.json").write_bytes(b"\xff\xfe not text")
    with pytest.raises(ConfigError, match="cannot be read as JSON text"):
        load_pretrained(ck)


def test_a_damaged_export_is_refused_by_its_checksums(export, tmp_path):
    path, _ = export
    header, payload = read_header(path / "model.safetensors")
    assert safetensors_io.DIGEST_KEY in header["__metadata__"]
    names = by_offset(header)
    victim = names[len(names) // 2]
    begin = header[victim]["data_offsets"][0]

    flipped = broken_copy(path, tmp_path / "flipped")  # one bit of one weight: finite, plausible, wrong
    body = bytearray(payload)
    body[begin + 1] ^= 0x01
    write_header(flipped / "model.safetensors", header, bytes(body))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(victim)}' does not match the SHA-256"):
        load_pretrained(flipped)

    # two same-shaped tensors whose data offsets were swapped: every header check passes, the values do not
    shapes: dict = {}
    for name in names:
        shapes.setdefault((header[name]["dtype"], tuple(header[name]["shape"])), []).append(name)
    a, b = next(group for group in shapes.values() if len(group) > 1)[:2]
    swapped_header = json.loads(json.dumps(header))
    swapped_header[a]["data_offsets"] = header[b]["data_offsets"]
    swapped_header[b]["data_offsets"] = header[a]["data_offsets"]
    swapped = broken_copy(path, tmp_path / "swapped")
    write_header(swapped / "model.safetensors", swapped_header, payload)
    with pytest.raises(CheckpointError, match=rf"tensor '({re.escape(a)}|{re.escape(b)})' does not match the SHA-256"):
        load_pretrained(swapped)


def test_export_bytes_depend_only_on_the_parameters(source, export, tmp_path):
    _, params, config = source
    path, _ = export
    again = save_pretrained(params, config, tmp_path / "again")
    assert snapshot(again) == snapshot(path)


def test_shard_names_may_not_leave_the_checkpoint_directory(source, tmp_path):
    _, params, config = source
    out = save_pretrained(params, config, tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((out / safetensors_io.INDEX_NAME).read_text())
    first = next(iter(index["weight_map"]))
    shutil.copy(out / index["weight_map"][first], tmp_path / "outside.safetensors")
    index["weight_map"][first] = "../outside.safetensors"
    (out / safetensors_io.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard names must be plain file names .*\.\./outside\.safetensors"):
        load_pretrained(out)


# Random damage to an export: a byte flipped, the file cut short, bytes inserted or deleted, the header length
# overwritten, in the safetensors header, its tensor data, or config.json. Whatever happens, only our two
# error types may escape, naming the damaged file; and if the load succeeds, the parameters are bit for bit
# the exported ones (no damage may load as a different model).
MUTATIONS = st.fixed_dictionaries({
    "target": st.sampled_from(["header", "data", "data", "config.json"]),
    "kind": st.sampled_from(["flip", "truncate", "insert", "delete", "length"]),
    "offset": st.integers(0, 2**31),  # taken modulo the target's size
    "mask": st.integers(1, 255),
    "blob": st.binary(min_size=1, max_size=12),
})
FUZZ_EXAMPLES = 80


def corrupt(ck: Path, mutation: dict) -> None:
    file = ck / ("config.json" if mutation["target"] == "config.json" else "model.safetensors")
    data = bytearray(file.read_bytes())
    begin, end = 0, len(data)
    if mutation["target"] != "config.json":
        header_end = 8 + int.from_bytes(data[:8], "little")
        begin, end = (8, header_end) if mutation["target"] == "header" else (header_end, len(data))
    pos = begin + mutation["offset"] % (end - begin)
    kind = mutation["kind"]
    if kind == "flip":
        data[pos] ^= mutation["mask"]
    elif kind == "truncate":
        del data[pos:]
    elif kind == "insert":
        data[pos:pos] = mutation["blob"]
    elif kind == "delete":
        del data[pos : pos + len(mutation["blob"])]
    else:  # the first 8 bytes (the header length, for safetensors) moved by up to +-half the file
        data[:8] = (int.from_bytes(data[:8], "little") + mutation["offset"] % len(data) - len(data) // 2).to_bytes(
            8, "little", signed=True)
    file.write_bytes(bytes(data))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=MUTATIONS)
def test_fuzz_only_our_errors_escape_and_nothing_loads_wrong(export, tmp_path_factory, mutation):
    path, reference = export
    ck = broken_copy(path, tmp_path_factory.mktemp("fuzz") / "ck")
    corrupt(ck, mutation)
    try:
        _, params, _ = load_pretrained(ck)
    except (CheckpointError, ConfigError) as e:
        assert str(ck) in str(e), e
        return
    loaded = flat(params)
    assert loaded.keys() == reference.keys()
    for k, v in reference.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)


# ------------------------------------------------------------------ training faults


_CLEAN_RUNS: dict[tuple, dict] = {}


def clean_run(accum: int, stop_after: int | None = None) -> dict:
    """Parameters of a fault-free run without checkpoints (after `stop_after` steps, or all of them)."""
    key = (accum, stop_after)
    if key not in _CLEAN_RUNS:
        _CLEAN_RUNS[key] = tr.train(*problem(), train_config(grad_accum_steps=accum), stop_after=stop_after).trainable
    return _CLEAN_RUNS[key]


@pytest.mark.parametrize("fault, accum", [("nan_loss", 1), ("inf_loss", 1), ("nan_grad", 1), ("inf_grad", 2)])
def test_non_finite_loss_or_gradient_stops_and_keeps_the_last_good_checkpoint(tmp_path, fault, accum):
    cfg = train_config(tmp_path / "ckpt", save_every=4, grad_accum_steps=accum)
    loss_fn, trainable, frozen, batch_fn = problem(fault, fault_step=9)
    with pytest.raises(tr.TrainingDiverged) as info:
        tr.train(loss_fn, trainable, frozen, batch_fn, cfg)
    bad = "loss" if FAULTS[fault][0] == "loss" else "grad_norm"
    message = str(info.value)
    assert message.startswith("step 10: non-finite") and bad in message, message
    assert f"the last good checkpoint in {tmp_path / 'ckpt'} is kept" in message
    if FAULTS[fault][0] == "grad":
        assert "loss" not in message.split(";")[0]  # the loss itself was still finite
    # The kept checkpoint is step 8, exactly the state a clean run has after 8 steps.
    kept = tr.train(*problem(), train_config(tmp_path / "ckpt", save_every=4, grad_accum_steps=accum, total_steps=8))
    assert kept.resumed_from == 8
    for k, v in clean_run(accum, stop_after=8).items():
        assert np.isfinite(np.asarray(kept.trainable[k])).all()
        np.testing.assert_array_equal(kept.trainable[k], v)


KILL_EXAMPLES = 4


@settings(max_examples=KILL_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kill_step=st.integers(1, train_config().total_steps - 1), save_every=st.sampled_from([3, 4, 5, 7]),
       accum=st.sampled_from([1, 2]))
def test_a_run_killed_at_a_random_step_resumes_to_the_same_parameters(tmp_path_factory, kill_step, save_every, accum):
    """Killed without warning (no save at the kill): the resumed run restarts from the last periodic
    checkpoint and must end bit-for-bit where an uninterrupted run ends."""
    ckpt = tmp_path_factory.mktemp("kill") / "ckpt"
    cfg = train_config(ckpt, save_every=save_every, grad_accum_steps=accum)
    with pytest.raises(Killed):
        tr.train(*problem(kill_step=kill_step), cfg)
    resumed = tr.train(*problem(), cfg)
    last_save = kill_step // save_every * save_every
    assert resumed.resumed_from == (last_save or None)
    for k, v in clean_run(accum).items():
        np.testing.assert_array_equal(resumed.trainable[k], v)


def test_a_sigkilled_process_resumes_to_the_same_parameters(tmp_path):
    """A real SIGKILL of a training process (no Python cleanup at all), then a resume in this process."""
    ckpt = tmp_path / "ckpt"
    kill_step, save_every, accum = 13, 5, 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(TESTS / "reliability_helpers.py"), str(ckpt), str(kill_step),
                            str(train_config().total_steps), str(save_every), str(accum)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    resumed = tr.train(*problem(), train_config(ckpt, save_every=save_every, grad_accum_steps=accum))
    assert resumed.resumed_from == 10
    for k, v in clean_run(accum).items():
        np.testing.assert_array_equal(resumed.trainable[k], v)


# ------------------------------------------------------------------ outputs: atomic, a full disk leaves the old one


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A real write failure from the kernel: files cannot grow past nbytes (EFBIG), as on a full disk."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write() instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def disk_full_on_call(n: int, write):
    """Wrap a file writer: its n-th call writes half of its output, then fails with ENOSPC."""
    calls = []

    def writer(path, *args, **kwargs):
        calls.append(path)
        write(path, *args, **kwargs)
        if len(calls) == n:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return writer


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_export_onto_a_full_disk_keeps_the_previous_export(source, tmp_path, monkeypatch, exchange):
    _, params, config = source
    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    out = save_pretrained(params, config, tmp_path / "out", max_shard_size=20_000)
    before = snapshot(out)
    changed = jax.tree_util.tree_map(lambda x: x * 2, params)
    save_pretrained(changed, config, tmp_path / "out", max_shard_size=20_000)  # a successful overwrite...
    assert snapshot(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # ...leaves nothing else
    before = snapshot(out)
    monkeypatch.setattr(ckpt_export, "write_safetensors", disk_full_on_call(2, ckpt_export.write_safetensors))
    with pytest.raises(CheckpointError, match=r"export failed .*No space left on device.*previous one is unchanged"):
        save_pretrained(params, config, tmp_path / "out", max_shard_size=20_000)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_next_write_removes_what_a_killed_write_left_behind(source, tmp_path):
    """A SIGKILLed writer cannot clean up its hidden temporary sibling; the next write to the same target does,
    and leaves alone the sibling of a writer that is still running (and unrelated hidden files)."""
    import subprocess

    _, params, config = source
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stale = [tmp_path / f".out.tmp-{dead.pid}-abc123", tmp_path / f".out.old-{dead.pid}-def456"]
        for d in stale:
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"half a file")
        busy = tmp_path / f".out.tmp-{alive.pid}-ghi789"
        busy.mkdir()
        unrelated = tmp_path / ".other.tmp-1-x"
        unrelated.mkdir()
        save_pretrained(params, config, tmp_path / "out")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", busy.name, unrelated.name])
        io.write_text_atomic(tmp_path / "note.txt", "first")
        (tmp_path / f".note.txt.tmp-{dead.pid}-zzz").write_text("torn")
        io.write_text_atomic(tmp_path / "note.txt", "second")
        assert (tmp_path / "note.txt").read_text() == "second"
        assert not (tmp_path / f".note.txt.tmp-{dead.pid}-zzz").exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_new_export_that_fails_leaves_no_directory(source, tmp_path):
    _, params, config = source
    with file_size_limit(20_000), pytest.raises(CheckpointError, match=r"File too large.*nothing was written"):
        save_pretrained(params, config, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def _report_results(value: float) -> dict:
    entry = {"value": value, "ci_low": value / 2, "ci_high": min(1.0, value * 1.5), "n": 8}
    return {s: {m: {"classification": entry, "rougeL": entry, "cloze": entry} for m in ("visual", "textual")}
            for s in ("forget", "test", "retain", "real")}


def _write_failing(kind: str, path: Path):
    if kind == "report":
        with file_size_limit(8_000):  # results.json and report.md fit, the plots do not
            write_report(path, "Method B", _report_results(0.5), {"seed": 1}, {"predictions_b.jsonl": b"{}\n"})
    else:
        lora = {"llm": {"layers_0": {"a": np.random.default_rng(1).standard_normal((128, 128)).astype(np.float32)}}}
        with file_size_limit(20_000):
            save_artifacts(path, lora, None, {"run": 2})


def _write_good(kind: str, path: Path):
    if kind == "report":
        write_report(path, "Method A", _report_results(0.25), {"seed": 0}, {"predictions_a.jsonl": b"{}\n"})
    else:
        lora = {"llm": {"layers_0": {"a": np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)}}}
        save_artifacts(path, lora, {"llm": {"layers_0": {"u": np.eye(4, 2, dtype=np.float32)}}}, {"run": 1})


@pytest.mark.parametrize("kind, error", [("report", ReportError), ("artifacts", CheckpointError)])
def test_a_failed_report_or_artifacts_write_keeps_the_previous_one(tmp_path, kind, error):
    out = tmp_path / kind
    _write_good(kind, out)
    before = snapshot(out)
    with pytest.raises(error, match=r"File too large.*previous .* unchanged"):
        _write_failing(kind, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]
    if kind == "artifacts":
        lora, projectors, meta = load_artifacts(out)
        assert meta == {"run": 1} and projectors is not None
    # and where there was nothing before, a failure leaves nothing
    with pytest.raises(error):
        _write_failing(kind, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]


def test_damaged_artifacts_and_results_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"not an artifacts directory .*no state"):
        load_artifacts(tmp_path)
    _write_good("artifacts", tmp_path / "art")
    (tmp_path / "art" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta\.json: not valid JSON"):
        load_artifacts(tmp_path / "art")
    _write_good("report", tmp_path / "rep")
    (tmp_path / "rep" / "results.json").write_text('{"methods": [1]}')
    with pytest.raises(ReportError, match=r"results\.json: not a results file"):
        write_report(tmp_path / "rep", "X", _report_results(0.5))


# ------------------------------------------------------------------ the CLI: one line, exit code 2, no traceback


def test_cli_reports_a_corrupt_checkpoint_in_one_line(source, tmp_path, capsys):
    path, _, _ = source
    ck = broken_copy(path, tmp_path / "ck")
    header, payload = read_header(ck / "model.safetensors")
    victim = by_offset(header)[3]
    header[victim]["shape"] = [7, 7, 7]
    write_header(ck / "model.safetensors", header, payload)
    assert cli.main(["inspect", str(ck)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vleraser: error:") and "Traceback" not in err
    assert str(ck / "model.safetensors") in err and repr(victim) in err


@pytest.mark.parametrize("exc", [
    CheckpointError("ck/model.safetensors: tensor 'x' ..."), ConfigError("ck/config.json: ..."),
    BenchmarkFormatError("forget_5: column 'ID', ID '7' (row 3): ...\nsecond line"),
    ReportError("out/results.json: ..."), tr.TrainingDiverged("step 10: non-finite loss; ... kept"),
    OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors"),
], ids=lambda e: type(e).__name__)
def test_cli_turns_each_known_error_into_one_line_and_exit_2(monkeypatch, capsys, exc):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_inspect", fail)
    assert cli.main(["inspect", "anything"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vleraser: error:") and str(exc).split("\n")[0] in err


def test_cli_lets_a_bug_raise(monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(cli, "cmd_inspect", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["inspect", "anything"])


# ------------------------------------------------------------------ determinism of the pipeline's numbers


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A synthetic benchmark (MLLMU layout) and a tiny random LLaVA with its tokenizer: the demo in miniature."""
    import datasets
    from conftest import make_torch_llava, tiny_llava_hf_config
    from transformers import AutoTokenizer

    from vleraser_jax.data.synthetic import synthesize, train_synthetic_tokenizer

    root = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_cache")
        data = synthesize(root / "bench", seed=0, num_people=20, num_celebrities=4, image_size=28,
                          num_base_portraits=4, progress=False)
        train_synthetic_tokenizer(data, root / "tok", vocab_size=512, image_size=28)
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tok"))
        hf_config = tiny_llava_hf_config()
        hf_config.text_config.vocab_size = len(tokenizer)
        hf_config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
        hf_config.text_config.eos_token_id = tokenizer.eos_token_id
        hf_config.text_config.pad_token_id = tokenizer.pad_token_id
        make_torch_llava(hf_config).save_pretrained(root / "ckpt")
        for f in (root / "tok").iterdir():
            shutil.copy(f, root / "ckpt" / f.name)
        yield root


def run_tiny_pipeline(world: Path, out: Path, seed: int) -> None:
    """What `vleraser demo` does per method, at toy scale: load -> VL-Eraser (vacuum projector, stage 1,
    deletion, export) -> evaluation on a seeded subsample with bootstrap CIs -> report."""
    from vleraser_jax.data.mllmu import load_benchmark
    from vleraser_jax.eval.evaluate import EvalConfig, evaluate
    from vleraser_jax.processing import load_processor
    from vleraser_jax.experiment.artifacts import save_method_run
    from vleraser_jax.experiment.methods import MethodRun
    from vleraser_jax.unlearn.trainer import RunSettings
    from vleraser_jax.unlearn.vl_eraser import VLEraserConfig, unlearn_vl_eraser

    model, params, _ = load_pretrained(world / "ckpt")
    processor = load_processor(world / "ckpt")
    bench = load_benchmark(world / "bench", 5, cache_dir=world / "hf_cache")
    unlearned, lora, projectors, info = unlearn_vl_eraser(
        model, params, processor, bench.forget_train, bench.retain_train,
        VLEraserConfig(rank=2, threshold_mode="rank", retained_rank=2),
        RunSettings(steps=1, batch_size=4, warmup_steps=0, max_length=64, seed=seed),
        entity_names={p.person_id: p.name for p in bench.forget}, log=lambda *_: None)
    save_method_run(out / "run", MethodRun("VL-Eraser", unlearned, info, lora, projectors), model.config,
                    source_dir=world / "ckpt")
    cfg = EvalConfig(sets=("forget", "retain"), modes=("visual",), tasks=("classification",), option_likelihood=False,
                     max_people=1, batch_size=16, max_new_tokens=2, bootstrap_resamples=100, seed=seed)
    result = evaluate(model, unlearned, processor, bench, cfg)
    predictions = "".join(json.dumps(p) + "\n" for p in result.predictions).encode()
    write_report(out / "report", "VL-Eraser", result.results, {"seed": seed}, {"predictions.jsonl": predictions})


def test_the_pipeline_numbers_are_identical_across_runs_with_the_same_seed(tiny_world, tmp_path):
    run_tiny_pipeline(tiny_world, tmp_path / "a", seed=0)
    run_tiny_pipeline(tiny_world, tmp_path / "b", seed=0)
    # Every byte of the report (numbers, predictions, plots) and of the exported model. The artifacts are
    # compared by value: orbax's files carry timestamps, and meta.json records timings.
    a, b = ({k: v for k, v in snapshot(tmp_path / r).items() if not k.startswith("run/artifacts/")} for r in "ab")
    assert {"report/results.json", "report/predictions.jsonl", "run/model/model.safetensors"} <= set(a)
    assert a == b
    (lora_a, proj_a, _), (lora_b, proj_b, _) = (load_artifacts(tmp_path / r / "run" / "artifacts") for r in "ab")
    for x, y in ((lora_a, lora_b), (proj_a, proj_b)):
        fx, fy = flat(x), flat(y)
        assert fx.keys() == fy.keys() and fx
        for k in fx:
            np.testing.assert_array_equal(fx[k], fy[k], err_msg=k)
