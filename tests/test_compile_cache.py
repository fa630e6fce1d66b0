"""The persistent compilation cache the pipeline commands turn on (train.workspace.use_compilation_cache), and the
bench that measures it. The cache is process-wide JAX state, so each case runs in a fresh interpreter."""

import json
import os
import subprocess
import sys

import pytest

from bench.compile_cache import format_table, summarize

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, jax.monitoring as monitoring
import ml_collections
from vleraser_jax.train.workspace import use_compilation_cache

events = []
monitoring.register_event_listener(lambda name, **_: events.append(name.rsplit("/", 1)[-1]))
path = use_compilation_cache(ml_collections.ConfigDict({"work_dir": sys.argv[1]}))
x = jnp.ones((8, 8))
hits, misses = [], []
for k in range(2):  # two new closures, one program: what two method runs in one process compile
    before = events.count("cache_hits"), events.count("cache_misses")
    step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    assert float(step(x)) > 0
    hits.append(events.count("cache_hits") - before[0])
    misses.append(events.count("cache_misses") - before[1])
print(json.dumps({"path": None if path is None else str(path), "hits": hits, "misses": misses}))
"""


def run_child(work_dir, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    base["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the toy program compiles in milliseconds
    done = subprocess.run([sys.executable, "-c", CHILD, str(work_dir)], env={**base, **env}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_closure_and_second_process_load_the_program_from_the_work_dir(tmp_path):
    first = run_child(tmp_path)
    assert first["path"] == str(tmp_path / "xla_cache")
    assert (first["hits"], first["misses"]) == ([0, 1], [1, 0])  # compiled once, read back for the new closure
    assert any((tmp_path / "xla_cache").iterdir())
    second = run_child(tmp_path)
    assert (second["hits"], second["misses"]) == ([1, 1], [0, 0])  # a new process compiles nothing


def test_jax_environment_variables_win(tmp_path):
    off = run_child(tmp_path, JAX_ENABLE_COMPILATION_CACHE="false")
    assert off == {"path": None, "hits": [0, 0], "misses": [0, 0]} and not (tmp_path / "xla_cache").exists()
    elsewhere = run_child(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"))
    assert elsewhere["path"] == str(tmp_path / "mine") and elsewhere["hits"] == [0, 1]
    assert not (tmp_path / "xla_cache").exists()


def _record(k, mode, first, second, compile_first=0.0):
    return {"round": k, "mode": mode, "method": "npo",
            "runs": [{"wall_s": first, "compile_s": compile_first}, {"wall_s": second, "compile_s": 0.0}]}


def test_bench_ratios_pair_modes_within_a_round():
    records = [_record(0, "off", 40, 40, 30), _record(0, "empty", 44, 10), _record(0, "filled", 16, 10),
               _record(1, "off", 60, 60, 30), _record(1, "empty", 64, 20), _record(1, "filled", 20, 20)]
    (row,) = summarize(records)
    assert row["rounds"] == 2
    assert row["ratio_repeat"] == pytest.approx((40 / 10 + 60 / 20) / 2)  # per-round ratios, then the median
    assert row["ratio_new_process"] == pytest.approx((40 / 16 + 60 / 20) / 2)
    assert row["off_first_compile_s"] == 30 and row["empty_second_s"] == 15
    table = format_table([row])
    assert "| npo | 50.0 (30.0) | 50.0 (0.0) | 54.0 (0.0) | 15.0 (0.0) | 18.0 (0.0) | 3.50 | 2.75 |" in table
