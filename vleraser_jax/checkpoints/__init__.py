"""HF safetensors checkpoints <-> Flax parameter pytrees (DESIGN §3).

- `names`: one name table per architecture (import and export through the same rows);
- `safetensors_io`: header validation, the deterministic writer, per-tensor checksums;
- `loading`: `load_pretrained` (every tensor checked, named in every error);
- `export`: `save_pretrained` (atomic, loads in transformers with no missing or unexpected keys);
- `sharded`: `load_pretrained_sharded` (each process reads only its devices' regions).
"""

from .export import save_pretrained
from .loading import load_config, load_pretrained, locate_tensors, open_checkpoint, weight_files
from .names import (LLAVA_TABLE, QWEN2VL_TABLE, Architecture, NameTable, Rule, Transform, architecture_for,
                    expected_shapes, init_params, register_architecture)
from .safetensors_io import (AUXILIARY_FILES, DIGEST_KEY, INDEX_NAME, WEIGHTS_NAME, CheckpointError,
                             read_safetensors_header, tensor_digest, write_safetensors)
from .sharded import load_pretrained_sharded

__all__ = [
    "AUXILIARY_FILES", "DIGEST_KEY", "INDEX_NAME", "LLAVA_TABLE", "QWEN2VL_TABLE", "WEIGHTS_NAME", "Architecture",
    "CheckpointError", "NameTable", "Rule", "Transform", "architecture_for", "expected_shapes", "init_params",
    "load_config", "load_pretrained", "load_pretrained_sharded", "locate_tensors", "open_checkpoint",
    "read_safetensors_header", "register_architecture", "save_pretrained", "tensor_digest", "weight_files",
    "write_safetensors",
]
