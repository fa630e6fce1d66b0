"""A training stage killed mid-run (SIGKILL, as a closed terminal does) resumes from its last orbax checkpoint
when the command is rerun, and ends with the parameters of a run that was never interrupted.

Marked slow: three `vleraser train` processes on a toy config.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from vleraser_jax.checkpoints import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
TOY = [
    "data.num_people=20", "data.num_celebrities=4", "data.num_base_portraits=6", "data.num_base_poses=1",
    "data.image_size=16", "data.vocab_size=512", "data.validation_people=2", "data.num_holdout=3",
    "model.vision_hidden_size=16", "model.vision_intermediate_size=32", "model.vision_layers=2",
    "model.vision_heads=2", "model.patch_size=8", "model.hidden_size=32", "model.intermediate_size=64",
    "model.layers=1", "model.heads=2", "model.kv_heads=1", "model.max_position_embeddings=256",
    "base.steps=400", "base.batch_size=4", "base.warmup_steps=1", "base.length_buckets=1", "base.mc_variants=1",
    "base.save_every=20",
]


def train_command(work_dir: Path) -> list[str]:
    return [sys.executable, "-m", "vleraser_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny_llava.py"),
            "--stage", "base", f"--config.work_dir={work_dir}", *(f"--config.{o}" for o in TOY)]


def exported(work_dir: Path) -> list[Path]:
    """The exported base models (not the .ckpt / .processor siblings)."""
    return [p for p in (work_dir / "models").glob("tiny_llava-base-*") if "." not in p.name
            and (p / "config.json").exists()]


def model_dir(work_dir: Path) -> Path:
    found = exported(work_dir)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_a_killed_stage_resumes_and_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    whole = tmp_path / "whole"
    subprocess.run(train_command(whole), check=True, env=env, cwd=ROOT, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    checkpoints = []
    while time.time() < deadline and proc.poll() is None:  # kill once a checkpoint past step 20 exists
        checkpoints = [p for p in (killed / "models").glob("*.ckpt/*") if p.name.isdigit() and int(p.name) >= 40]
        if checkpoints:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    assert checkpoints and proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not exported(killed)  # no model was exported

    out = subprocess.run(train_command(killed), check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    assert "resumed from step" in out.stdout + out.stderr
    _, a, _ = load_pretrained(model_dir(whole))
    _, b, _ = load_pretrained(model_dir(killed))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
