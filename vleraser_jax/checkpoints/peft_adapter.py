"""A LoRA tree as a PEFT adapter directory for the torch model of the same checkpoint.

What PEFT (0.21) reads, and so what is written here (checked against its source and, in
`tests/test_peft_adapter.py`, against what PEFT itself saves for the same model):

- `adapter_model.safetensors`: per adapted Linear, `base_model.model.<module>.lora_A.weight` [r, in] and
  `base_model.model.<module>.lora_B.weight` [out, r] (`utils/save_and_load.get_peft_model_state_dict` drops
  the adapter name; `set_peft_model_state_dict` puts it back). `<module>` is the torch module name: the
  name table's HF name of the kernel without `.weight`.
- `adapter_config.json`: a `LoraConfig` (`peft_type` "LORA", `r`, `lora_alpha`, `target_modules` = the
  full names of the adapted modules, ...). PEFT computes scaling = lora_alpha / r and merges
  W += scaling · B A (`tuners/lora/layer.Linear.get_delta_weight`). Keys LoraConfig does not know are
  dropped with a warning telling the user to upgrade PEFT (`config.PeftConfigMixin.from_peft_type`), so
  the config holds only LoraConfig fields and how to merge goes into a sidecar, `vleraser_merge.json`
  (PEFT ignores other files), and the directory's README.md.

A vacuum projector is folded into A: lora_A = (P a)ᵀ = A P, so PEFT's delta is scale · B A P exactly. An
adapter whose unlearned model is W − s · delta (VL-Eraser's deletion) is merged with weight −s:

    model = PeftModel.from_pretrained(vanilla, adapter_dir)
    with peft.helpers.rescale_adapter_scale(model, merge_weight):
        unlearned = model.merge_and_unload()
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from ..io import atomic_directory
from ..models.layers import vacuum_project
from .names import Transform, architecture_for, expected_shapes
from .safetensors_io import DIGEST_KEY, CheckpointError, tensor_digest, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_FILE = "vleraser_merge.json"
_PREFIX = "base_model.model."


def _entries(tree) -> dict[str, dict]:
    """'/'-joined module path -> its {"a", "b", "scale"} (or projector) entry."""
    out: dict[str, dict] = {}
    for path, value in traverse_util.flatten_dict(tree or {}).items():
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = value
    return out


def _natural(name: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _module_name(arch, module: str) -> str:
    """The torch module name of a Flax Dense path (`llm/layers_0/mlp/down_proj` -> `model.language_model...`)."""
    name, transform = arch.table.to_hf_name(f"{module}/kernel")  # transformers 5 in-memory names
    if transform is not Transform.LINEAR or not name.endswith(".weight"):
        raise CheckpointError(f"LoRA on {module!r}: PEFT adapters here cover torch Linear layers only")
    return name[: -len(".weight")]


def peft_state(lora, config, projectors=None) -> tuple[dict[str, np.ndarray], dict]:
    """(PEFT tensors {key: array}, {"r", "lora_alpha", "target_modules"}) of a LoRA tree on `config`'s model.

    lora: {module path: {"a": Aᵀ [in, r], "b": Bᵀ [r, out], "scale": α/r}}; projectors: vacuum projectors at
    the same paths, folded into A. Errors name the module at fault.
    """
    arch = architecture_for(config.model_type)
    shapes = expected_shapes(arch.model_cls(config))
    vacuum = _entries(projectors)
    tensors: dict[str, np.ndarray] = {}
    targets, ranks, scales = [], set(), set()
    for module, entry in sorted(_entries(lora).items(), key=lambda kv: _natural(kv[0])):
        missing = {"a", "b", "scale"} - set(entry)
        if missing:
            raise CheckpointError(f"LoRA entry {module!r} lacks {sorted(missing)}")
        kernel = shapes.get(f"{module}/kernel")
        a, b = entry["a"], entry["b"]
        if kernel is None:
            raise CheckpointError(f"LoRA entry {module!r} has no kernel in the {config.model_type} model")
        if a.ndim != 2 or b.ndim != 2 or (a.shape[0], b.shape[1]) != tuple(kernel[0]) or a.shape[1] != b.shape[0]:
            raise CheckpointError(f"LoRA entry {module!r}: a {tuple(a.shape)} and b {tuple(b.shape)} do not "
                                  f"factor its kernel {tuple(kernel[0])}")
        if module in vacuum:
            a = vacuum_project(a.T, vacuum[module]).T  # P a, the column-wise fold (P is symmetric)
        name = _module_name(arch, module)
        for part, array in (("lora_A", a.T), ("lora_B", b.T)):  # torch Linear weights are [out, in]
            array = np.ascontiguousarray(np.asarray(jax.device_get(array), np.float32))
            if not np.all(np.isfinite(array)):
                raise CheckpointError(f"refusing to export the LoRA of {module!r}: {part} has NaN or Inf")
            tensors[f"{_PREFIX}{name}.{part}.weight"] = array
        targets.append(name)
        ranks.add(int(a.shape[1]))
        scales.add(float(np.asarray(entry["scale"])))
    if not targets:
        raise CheckpointError("the LoRA tree is empty: there is no adapter to export")
    unknown = sorted(set(vacuum) - {m for m in _entries(lora)})
    if unknown:
        raise CheckpointError(f"vacuum projectors at {unknown[:3]} have no LoRA entry to fold into")
    if len(ranks) != 1 or len(scales) != 1:
        raise CheckpointError(f"the LoRA's ranks {sorted(ranks)} / scales {sorted(scales)} differ between modules; "
                              "one adapter_config.json holds one r and lora_alpha")
    (rank,), (scale,) = ranks, scales
    alpha = scale * rank
    return tensors, {"r": rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "target_modules": targets}


def adapter_config(fields: dict, config, base_model: str | None = None) -> dict:
    """adapter_config.json: LoraConfig fields only (any other key makes PEFT warn), as PEFT writes them."""
    hf = config.to_hf_config()
    return {
        "peft_type": "LORA", "task_type": None, "r": fields["r"], "lora_alpha": fields["lora_alpha"],
        "target_modules": fields["target_modules"], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "base_model_name_or_path": base_model, "revision": None,
        # what PEFT records for a model without task_type; AutoPeftModel builds the base model class from it
        "auto_mapping": {"base_model_class": hf["architectures"][0],
                         "parent_library": f"transformers.models.{config.model_type}.modeling_{config.model_type}"},
    }


def _readme(merge: dict) -> str:
    weight = merge["merge_weight"]
    scaled = (f"with rescale_adapter_scale(model, {weight!r}):  # W <- W + ({weight!r}) * lora_alpha / r * B A\n"
              "    unlearned = model.merge_and_unload()") if weight != 1.0 else "unlearned = model.merge_and_unload()"
    imports = "from peft import PeftModel" + ("\nfrom peft.helpers import rescale_adapter_scale" if weight != 1.0 else "")
    return (f"# PEFT LoRA adapter: {merge['method']}\n\n{merge['meaning']}\n\n"
            f"Merged into the vanilla model with weight {weight!r} it gives this run's unlearned model "
            f"(`vleraser_merge.json` says the same for programs):\n\n```python\n{imports}\n"
            f"model = PeftModel.from_pretrained(vanilla, \"path/to/this/adapter\")\n{scaled}\n```\n")


def save_peft_adapter(path, lora, config, projectors=None, *, merge_weight: float = 1.0, method: str = "",
                      meaning: str = "", base_model: str | None = None) -> Path:
    """Write `path/` (adapter_config.json, adapter_model.safetensors, vleraser_merge.json, README.md) atomically.

    merge_weight: the weight that turns the vanilla model into the unlearned one (W + weight · delta): −strength
    for VL-Eraser's deletion, +1 for a baseline whose LoRA was merged. base_model: the vanilla checkpoint's path
    (PEFT's base_model_name_or_path). A failure leaves any previous adapter at `path` intact.
    """
    tensors, fields = peft_state(lora, config, projectors)
    digests = json.dumps({n: tensor_digest(n, t) for n, t in sorted(tensors.items())})
    merge = {"merge_weight": float(merge_weight), "method": method, "meaning": meaning,
             "vacuum_projector": "folded into lora_A (A P)" if projectors else None,
             "peft": "with peft.helpers.rescale_adapter_scale(model, merge_weight): model.merge_and_unload()"}
    target = Path(path)
    try:
        with atomic_directory(target) as tmp:
            write_safetensors(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt", DIGEST_KEY: digests})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(fields, config, base_model), indent=2,
                                                         sort_keys=True))
            (tmp / MERGE_FILE).write_text(json.dumps(merge, indent=2, sort_keys=True))
            (tmp / "README.md").write_text(_readme(merge))
    except OSError as e:
        previous = "the previous one is unchanged" if target.exists() else "nothing was written"
        raise CheckpointError(f"{target}: writing the adapter failed ({e}); {previous}") from e
    return target
