"""Safetensors only, no remote code, nothing fetched at run time."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from vleraser_jax import cli

PACKAGE = Path(__file__).resolve().parent.parent / "vleraser_jax"


def test_package_never_unpickles_or_runs_remote_code():
    forbidden = re.compile(r"torch\.load\(|pickle\.loads?\(|import pickle|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True")
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if forbidden.search(line)]
    assert not hits, hits


def test_cli_runs_offline_with_networking_disabled(full_checkpoint, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["generate", str(full_checkpoint), "--question", "Who is this?", "--image",
                     str(full_checkpoint / "face.png"), "--max-new-tokens", "3"]) == 0
    assert "A:" in capsys.readouterr().out
    assert all(os.environ[v] == "1" for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))
