"""A method run's outputs on disk: the unlearned model (`save_pretrained`); for a method that trained a LoRA, the
LoRA (and VL-Eraser's vacuum projectors) as orbax artifacts, restorable with `load_artifacts`, and as a PEFT
adapter for the torch model (`export_adapter`); the run's info as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoints import CheckpointError, load_config, save_pretrained
from ..checkpoints.peft_adapter import save_peft_adapter
from ..io import atomic_directory, write_text_atomic

ADAPTER_DIR = "adapter"
_MEANINGS = {  # what a run's PEFT adapter holds: (subtracted?, behind a vacuum projector?)
    (True, True): "The LoRA VL-Eraser distilled on the forget set behind the vacuum projector P (folded into "
                  "lora_A as A P): what its deletion subtracted.",
    (True, False): "The LoRA VL-Eraser distilled on the forget set (no vacuum projector): what its deletion "
                   "subtracted.",
    (False, False): "The LoRA this method trained; its unlearned model is the vanilla model with the LoRA merged.",
}


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


def merge_weight(meta: dict, where) -> float:
    """The weight that merges a run's LoRA into the vanilla model to give its unlearned one (the method records it
    as `lora_merge_weight`; VL-Eraser artifacts from before that field: −deletion_strength)."""
    if "lora_merge_weight" in meta:
        return float(meta["lora_merge_weight"])
    strength = (meta.get("config") or {}).get("deletion_strength")
    if strength is None:
        raise CheckpointError(f"{where}: records no lora_merge_weight (nor VL-Eraser's deletion_strength)")
    return -float(strength)


def write_adapter(path, lora, projectors, meta: dict, model_config, *, base_model=None, where="") -> Path:
    """The run's LoRA as a PEFT adapter at `path` (`checkpoints.peft_adapter.save_peft_adapter`)."""
    weight = merge_weight(meta, where or path)
    meaning = _MEANINGS.get((weight < 0, projectors is not None), "The LoRA this method trained.")
    return save_peft_adapter(path, lora, model_config, projectors, merge_weight=weight,
                             method=str(meta.get("title") or meta.get("method") or "VL-Eraser"), meaning=meaning,
                             base_model=None if base_model is None else str(Path(base_model).absolute()))


def export_adapter(run_dir, out) -> Path:
    """`vleraser export-adapter`: a method run directory's LoRA (from `artifacts/`) as a PEFT adapter at `out`."""
    run_dir = Path(run_dir)
    if not (run_dir / "artifacts").exists():
        if (run_dir / "info.json").exists():
            try:
                title = json.loads((run_dir / "info.json").read_text()).get("title", "this method")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                title = "this method"
            raise CheckpointError(f"{run_dir}: {title} trained the model's own parameters, not a LoRA, so there is "
                                  f"no adapter to export; its unlearned model is {run_dir / 'model'}")
        raise CheckpointError(f"{run_dir}: not a method run directory (no artifacts/ or info.json)")
    lora, projectors, meta = load_artifacts(run_dir / "artifacts")
    _, config = load_config(run_dir / "model")
    return write_adapter(out, lora, projectors, meta, config, base_model=meta.get("base_model"),
                         where=run_dir / "artifacts" / "meta.json")


def save_method_run(out_dir, run, model_config, *, source_dir=None, adapter: bool = True) -> Path:
    """A method run's outputs under `out_dir`: `model/` (the unlearned model, loadable in transformers; tokenizer
    and processor files copied from `source_dir`, the vanilla checkpoint); for a method that trained a LoRA,
    `artifacts/` (the LoRA and VL-Eraser's vacuum projectors, the run's info as their meta.json) and, unless
    `adapter` is False, `adapter/` (the same LoRA as a PEFT adapter for the vanilla torch model); otherwise
    `info.json`."""
    out_dir = Path(out_dir)
    if run.lora is not None:
        meta = {k: v for k, v in run.info.items() if not k.endswith("_history")}
        meta["title"] = run.title
        if source_dir is not None:
            meta["base_model"] = str(Path(source_dir).absolute())
        save_artifacts(out_dir / "artifacts", run.lora, run.vacuum, meta)
        if adapter:
            write_adapter(out_dir / ADAPTER_DIR, run.lora, run.vacuum, meta, model_config, base_model=source_dir)
    else:
        write_text_atomic(out_dir / "info.json", json.dumps(run.info, indent=2, default=str))
    save_pretrained(run.params, model_config, out_dir / "model", copy_files_from=source_dir)
    return out_dir
