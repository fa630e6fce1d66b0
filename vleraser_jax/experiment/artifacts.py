"""A method run's outputs on disk: the unlearned model (`save_pretrained`), and for VL-Eraser the LoRA and vacuum
projectors it subtracted (orbax, restorable with `load_artifacts`), with the run's info as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoints import CheckpointError, save_pretrained
from ..io import atomic_directory, write_text_atomic


def save_artifacts(path: Path, lora, projectors, meta: dict) -> None:
    """LoRA and vacuum projectors as an orbax checkpoint (restorable with `load_artifacts`), meta as JSON.

    Written into a temporary sibling directory and swapped into place: a failure (a full disk included)
    leaves any previous artifacts at `path` intact and no partial directory.
    """
    import orbax.checkpoint as ocp  # heavy: only when artifacts are written

    path = Path(path).absolute()
    tree = {"lora": lora, "vacuum": projectors if projectors is not None else {}}
    try:
        with atomic_directory(path) as tmp:
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(tmp / "state", tree)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    except (OSError, ValueError) as e:  # orbax reports write failures as either
        previous = "the previous artifacts are unchanged" if path.exists() else "nothing was written"
        raise CheckpointError(f"{path}: writing the artifacts failed ({e}); {previous}") from e


def load_artifacts(path: Path) -> tuple[dict, dict | None, dict]:
    """(lora, vacuum projectors or None, meta) as `save_artifacts` wrote them; CheckpointError names what is wrong."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    for required in (path / "state", path / "meta.json"):
        if not required.exists():
            raise CheckpointError(f"{path}: not an artifacts directory written by save_artifacts (no {required.name})")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: not valid JSON ({e})") from None
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(path / "state")
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"{path / 'state'}: cannot restore the LoRA/vacuum projector checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(tree, dict) or "lora" not in tree or "vacuum" not in tree:
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"{path / 'state'}: expected 'lora' and 'vacuum' trees, got {found}")
    return tree["lora"], (tree["vacuum"] or None), meta


def save_method_run(out_dir, run, model_config, *, source_dir=None) -> Path:
    """A method run's outputs under `out_dir`: `model/` (the unlearned model, loadable in transformers; tokenizer
    and processor files copied from `source_dir`), and either `artifacts/` (VL-Eraser: the LoRA and vacuum
    projectors it deleted, the run's info as their meta.json) or `info.json` (the baselines)."""
    out_dir = Path(out_dir)
    if run.lora is not None:
        meta = {k: v for k, v in run.info.items() if not k.endswith("_history")}
        save_artifacts(out_dir / "artifacts", run.lora, run.vacuum, meta)
    else:
        write_text_atomic(out_dir / "info.json", json.dumps(run.info, indent=2, default=str))
    save_pretrained(run.params, model_config, out_dir / "model", copy_files_from=source_dir)
    return out_dir
