"""configs/*.py loading with --config.a.b=value overrides (literals parsed safely, types enforced)."""

from __future__ import annotations

import pytest

from vleraser_jax.config import load_config
from vleraser_jax.models.configs import ConfigError


def test_overrides_are_typed_and_checked(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict({'lr': 0.1, 'steps': 10, 'name': 'x', 'flag': False,\n"
        "                                      'layers': (1, 2), 'sub': {'rank': 8}})\n"
    )
    c = load_config(path, ["--config.lr=3", "--config.steps=20", "--config.name=1e-3", "--config.flag=true",
                           "--config.layers=[3, 4]", "--config.sub.rank=4"])
    assert c.lr == 3.0 and isinstance(c.lr, float) and c.steps == 20 and c.name == "1e-3" and c.flag is True
    assert c.layers == (3, 4) and c.sub.rank == 4
    with pytest.raises(ConfigError, match="no field 'sub.nope'"):
        load_config(path, ["--config.sub.nope=1"])
    with pytest.raises(ConfigError, match="steps"):
        load_config(path, ["--config.steps=abc"])
    with pytest.raises(ConfigError, match="expected --config.field=value"):
        load_config(path, ["--config.steps"])
    # values are literals, never evaluated code
    c = load_config(path, ["--config.name=__import__('os').getcwd()"])
    assert c.name == "__import__('os').getcwd()"


def test_shipped_configs_load():
    for name in ("tiny_llava",):
        c = load_config(f"configs/{name}.py")
        assert c.name == name
