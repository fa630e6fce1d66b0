"""Safetensors only, no remote code, nothing fetched at run time, config values never executed."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vleraser_jax import cli

PACKAGE = Path(__file__).resolve().parent.parent / "vleraser_jax"

# What the package must never contain (each line of every .py file is searched).
FORBIDDEN = {
    "unpickling": r"torch\.load\(|pickle\.loads?\(|import pickle|allow_pickle\s*=\s*True|\bdill\b|cloudpickle"
                  r"|joblib\.load|marshal\.loads?\(|\bshelve\b",
    "remote code": r"trust_remote_code\s*=\s*True",
    "evaluating text": r"(?<![\w.])eval\(|(?<![\w.])exec\(|__import__\(|(?<![\w.])compile\(|yaml\.(unsafe_)?load\(",
    "a shell": r"os\.system\(|os\.popen\(|\bsubprocess\b|shell\s*=\s*True|\bpty\.spawn",
    "expanding variables in paths": r"expandvars",
}


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_package_never_unpickles_evaluates_or_runs_remote_code(what):
    forbidden = re.compile(FORBIDDEN[what])
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if forbidden.search(line)]
    assert not hits, hits


def test_the_forbidden_patterns_do_match_what_they_forbid():
    samples = {"unpickling": "state = torch.load(path)", "remote code": "from_pretrained(p, trust_remote_code=True)",
               "evaluating text": "value = eval(text)", "a shell": "subprocess.run(cmd, shell=True)",
               "expanding variables in paths": "os.path.expandvars(root)"}
    for what, line in samples.items():
        assert re.search(FORBIDDEN[what], line), what
    assert not re.search(FORBIDDEN["evaluating text"], "ast.literal_eval(text); re.compile(p)")


class _TouchOnUnpickle:
    """Unpickling this creates `marker`: proof that a pickle was opened."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickled_weights_next_to_safetensors_are_never_opened(full_checkpoint, tmp_path):
    from vleraser_jax.checkpoints import CheckpointError, load_pretrained

    marker = tmp_path / "unpickled"
    both = shutil.copytree(full_checkpoint, tmp_path / "both")
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    load_pretrained(both)
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(full_checkpoint / "config.json", only / "config.json")
    (only / "pytorch_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_pretrained(only)
    assert not marker.exists()


def test_remote_code_in_a_checkpoint_is_never_imported(full_checkpoint, tmp_path):
    """A tokenizer_config.json whose auto_map points at a module shipped in the checkpoint (as
    trust_remote_code models do): loading the processor must not import it."""
    from vleraser_jax.processing import load_processor

    marker = tmp_path / "remote_code_ran"
    ck = shutil.copytree(full_checkpoint, tmp_path / "ck")
    (ck / "evil_tokenizer.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                          "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((ck / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (ck / "tokenizer_config.json").write_text(json.dumps(cfg))
    try:
        load_processor(ck)
    except ValueError:
        pass  # refusing is fine too; running the code is not
    assert not marker.exists()


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


SITECUSTOMIZE = '''
import atexit, json, os, socket, sys

LOG = os.environ["NETWORK_LOG"]


def _refuse(*args, **kwargs):
    with open(LOG, "a") as f:
        f.write(repr(args[:2]) + "\\n")
    raise OSError("networking is disabled in this test")


socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = _refuse


@atexit.register
def _report_offline_flags():
    hub = sys.modules.get("huggingface_hub.constants")
    with open(os.environ["FLAGS_LOG"], "w") as f:
        json.dump({"HF_HUB_OFFLINE": getattr(hub, "HF_HUB_OFFLINE", None)}, f)
'''


def test_cli_in_a_fresh_process_sets_offline_mode_and_opens_no_socket(full_checkpoint, tmp_path):
    """No HF_*_OFFLINE in the environment, an empty HF cache, every socket refused and logged: the CLI
    itself must switch the libraries offline, and generation must work without a single connection."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    offline_vars = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in offline_vars}
    env.update(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), HF_HOME=str(tmp_path / "hf"),
               NETWORK_LOG=str(tmp_path / "network.log"), FLAGS_LOG=str(tmp_path / "flags.json"))
    command = ["generate", str(full_checkpoint), "--question", "Who?", "--image", str(full_checkpoint / "face.png"),
               "--max-new-tokens", "2"]
    run = subprocess.run([sys.executable, "-m", "vleraser_jax.cli", *command], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "A:" in run.stdout, run.stderr[-3000:]
    assert not (tmp_path / "network.log").exists(), (tmp_path / "network.log").read_text()
    assert json.loads((tmp_path / "flags.json").read_text()) == {"HF_HUB_OFFLINE": True}


def test_cli_switches_already_imported_libraries_offline(full_checkpoint, monkeypatch, capsys):
    """In a process that imported huggingface_hub online (a notebook), main() still turns it offline; a hub
    repo id is refused as a path, never fetched."""
    import huggingface_hub.constants as hub

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    assert cli.main(["inspect", "llava-hf/llava-1.5-7b-hf"]) == 2
    assert "llava-hf/llava-1.5-7b-hf: not a directory" in capsys.readouterr().err
    assert hub.HF_HUB_OFFLINE is True


@pytest.mark.parametrize("value", ["$(touch pwned)", "`touch pwned`", "x; touch pwned",
                                   "__import__('os').system('touch pwned')", "{__import__('os').system('touch pwned')}",
                                   "$HOME/../pwned"])
def test_paths_from_configs_are_used_literally_never_executed(tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parent.parent / "configs" / "tiny_llava.py"
    code = cli.main(["train", "--config", str(config), "--stage", "base", f"--config.work_dir={tmp_path / 'work'}",
                     "--config.data.source=mllmu", f"--config.data.root={value}"])
    err = capsys.readouterr().err
    assert code == 2 and f"data.root {value} does not exist" in err, err
    assert not list(tmp_path.rglob("pwned")) and not (Path.home().parent / "pwned").exists()
