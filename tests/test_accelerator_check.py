"""bench/accelerator_check.sh runs on a CPU (what needs a GPU marked skipped), so CI keeps it from rotting."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_accelerator_check_runs_on_cpu_and_says_what_it_skipped(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "accelerator_check.sh"), "--steps", "2", "--reps", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert result["backend"] == "cpu" and result["size"] == "tiny"
    assert any("GPU" in s for s in result["skipped"])
    assert result["parity"]["float32"]["ok"] and result["parity"]["float32"]["max_rel_vs_torch"] < 1e-4
    bf16 = result["parity"]["bfloat16"]
    assert bf16["ok"] and 0 < bf16["jax_max_rel_vs_torch_f32"] < 0.1  # bf16 rounding is visible, not wrong
    step = result["stage1_step"]
    assert step["median_ms"] > 0 and step["xla_flops"] > 0 and step["mfu"] is None
    assert result["generation"]["tok_s"] > 0
