"""Loading `configs/*.py` (ml_collections `get_config()` files) with `--config.a.b=value` overrides.

Override values are parsed as Python literals with `ast.literal_eval` (never `eval`), falling back to the
plain string, then checked against the field's existing type by ml_collections.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections

from .models.configs import ConfigError


def _literal(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of the file at `path`, then `a.b=value` overrides (a leading `--config.` is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"vleraser_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    config = module.get_config()
    for item in overrides:
        key, sep, value = item.removeprefix("--").removeprefix("config.").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected --config.field=value")
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in filter(None, parent.split(".")):
            if part not in node:
                raise ConfigError(f"override {item!r}: {path} has no field {key!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override {item!r}: {path} has no field {key!r}")
        new = _literal(value)
        old = node[leaf]
        if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
            new = float(new)
        if isinstance(old, str) and not isinstance(new, str):
            new = value
        if isinstance(old, tuple) and isinstance(new, list):
            new = tuple(new)
        try:
            node[leaf] = new
        except TypeError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return config
