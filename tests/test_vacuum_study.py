"""The vacuum energy study and its FFN-width repetition: the outside-span share against numpy's least squares, the
row split, the block averages, and a toy end to end run of `vleraser vacuum-study --widths`."""

from __future__ import annotations

import numpy as np
import pytest

from vleraser_jax.experiment import vacuum_study, width_study
from vleraser_jax.experiment.vacuum_study import StudyRow


def test_outside_share_is_the_least_squares_residual_energy():
    rng = np.random.default_rng(0)
    span = rng.standard_normal((24, 5))
    basis, _ = np.linalg.qr(span)  # orthonormal columns
    keys = rng.standard_normal((40, 24)).astype(np.float32)
    coef, *_ = np.linalg.lstsq(span, keys.T.astype(np.float64), rcond=None)
    residual = keys.T - span @ coef
    expected = float((residual ** 2).sum() / (keys.astype(np.float64) ** 2).sum())
    assert vacuum_study.outside_share(keys, basis) == pytest.approx(expected, rel=1e-9)
    assert vacuum_study.outside_share(span.T, basis) == pytest.approx(0.0, abs=1e-12)  # inside the span: nothing out
    assert vacuum_study.outside_share(keys, np.zeros((24, 0))) == pytest.approx(1.0)  # empty span: everything out


class _Row:
    def __init__(self, person_id, k):
        self.person_id, self.k = person_id, k


def test_split_rows_alternates_within_each_person_and_keeps_heldout_people_apart():
    rows = [_Row(p, k) for k in range(4) for p in ("a", "b", "c")]
    stats, other, out = vacuum_study.split_rows(rows, heldout={"c"})
    assert [(r.person_id, r.k) for r in stats] == [("a", 0), ("b", 0), ("a", 2), ("b", 2)]
    assert [(r.person_id, r.k) for r in other] == [("a", 1), ("b", 1), ("a", 3), ("b", 3)]
    assert {r.person_id for r in out} == {"c"} and len(out) == 4


def test_width_summary_averages_blocks_and_divides_the_means():
    rows = [StudyRow("image+text", "tokens", 0.9, "lm/layers_0", 32, 60, 0.2, 0.1, 0.2),
            StudyRow("image+text", "tokens", 0.9, "lm/layers_1", 16, 60, 0.4, 0.1, 0.3),
            StudyRow("image", "mean", 0.9, "lm/layers_0", 4, 9, 0.9, 0.9, 0.9)]
    summary = {(r.source, r.pooling): r for r in width_study.summarize_width(64, rows)}
    text = summary[("image+text", "tokens")]
    assert text.blocks == 2 and text.retained_fraction == pytest.approx(24 / 64)
    assert (text.forget_outside, text.retain_outside, text.heldout_outside) == pytest.approx((0.3, 0.1, 0.25))
    assert text.selectivity == pytest.approx(3.0)  # ratio of the block means, not the mean of block ratios
    assert summary[("image", "mean")].selectivity == pytest.approx(1.0)


def test_width_study_refuses_a_pretrained_model_and_a_bad_width(tmp_path, capsys):
    from tests.test_train_stages import CONFIG
    from vleraser_jax.config import load_config

    c = load_config(CONFIG, [f"--config.work_dir={tmp_path}"])
    assert width_study.config_at_width(c, 1024).model.intermediate_size == 1024
    plan = width_study.describe_width_study(c, [1024])  # said up front: nothing is cached in a fresh work dir
    stages = (f"base train ({c.base.steps} steps), oracle train ({c.oracle.steps} steps), "
              f"vanilla train ({c.vanilla.steps} steps)")
    assert f"d_ff 1024: {stages}" in plan
    assert c.model.intermediate_size == 512  # the caller's config is left alone
    with pytest.raises(ValueError, match="positive whole FFN width"):  # a ConfigError: the CLI prints it, exit 2
        width_study.config_at_width(c, 0)
    from vleraser_jax import cli

    assert cli.main(["vacuum-study", "--config", str(CONFIG), "--widths", "512", "-4",
                     f"--config.work_dir={tmp_path}"]) == 2
    assert "-4 is not a positive whole FFN width" in capsys.readouterr().err
    c.model.checkpoint = "/models/llava-1.5-7b-hf"
    with pytest.raises(ValueError, match="pretrained model's FFN width is fixed"):
        width_study.config_at_width(c, 1024)


@pytest.mark.slow
def test_width_study_trains_each_width_and_writes_its_tables_and_plot(tmp_path, monkeypatch):
    import datasets

    from tests.test_train_stages import CONFIG, TOY
    from vleraser_jax import cli

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    overrides = [f"--config.{o}" for o in (*TOY, f"work_dir={tmp_path}", "oracle.enabled=False",
                                           "vanilla.from_oracle=False")]
    assert cli.main(["vacuum-study", "--config", str(CONFIG), "--heldout-people", "2", "--widths", "96", "64",
                     *overrides]) == 0
    out = next((tmp_path / "reports").glob("*/width_study"))
    assert {p.name for p in out.iterdir()} == {"vacuum_study_ffn64.md", "vacuum_study_ffn96.md", "width_study.md",
                                               "width_study.png"}
    table = (out / "width_study.md").read_text()
    assert "| 64 |" in table and "| 96 |" in table and "(2 people)" in table  # knowledge of the 2 validation people
    per_block = (out / "vacuum_study_ffn96.md").read_text()
    retained = [int(line.split("|")[5].split("/")[1]) for line in per_block.splitlines()[2:]]
    assert retained and max(retained) <= 96  # numerical rank capped by the width
