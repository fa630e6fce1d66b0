"""The matched-dose study's pieces: the setting that pins a dose, the paired comparison, the report."""

from __future__ import annotations

import numpy as np
import pytest

from vleraser_jax.eval import report_dose
from vleraser_jax.eval.statistics import paired_difference
from vleraser_jax.experiment.dose_study import dose_setting, study_eval_config


def items(values: dict[str, list[float]], set_name="forget", metric="cloze", mode="visual"):
    """Per-item scores: {person: [value of item 0, item 1, ...]}."""
    return [{"set": set_name, "mode": mode, "metric": metric, "person": p, "item": i, "value": v}
            for p, vs in values.items() for i, v in enumerate(vs)]


def test_a_dose_is_the_learning_rate_and_exact_steps():
    assert dose_setting("npo", 3e-4, 114) == {"learning_rate": 3e-4, "steps": 114, "epochs": None}
    assert dose_setting("vl_eraser", 1e-3, 100) == {"learning_rate": 1e-3, "steps": 100}
    with pytest.raises(ValueError, match="unknown method"):
        dose_setting("sgd", 1e-3, 10)


def test_the_study_scores_the_selection_metrics_on_forget_retain_and_real():
    from pathlib import Path

    from vleraser_jax.config import load_config

    c = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny_llava.py")
    e = study_eval_config(c, 30)
    assert e.tasks == ("cloze",) and e.option_likelihood and e.sets == ("forget", "retain", "real")
    assert e.max_people == 30 and study_eval_config(c, 0).max_people is None


def test_pairs_are_matched_by_person_and_item_whatever_the_order():
    rng = np.random.default_rng(0)
    first = {f"p{k}": list(rng.integers(0, 2, 4).astype(float)) for k in range(12)}
    second = {p: [1.0 - v if k == 0 else v for k, v in enumerate(vs)] for p, vs in first.items()}
    a, b = items(first), items(second)
    out = report_dose.compare_rows({"items": a[::-1]}, {"items": b}, cells=(("forget", "cloze"),))
    ours = out["forget/cloze/visual"]
    keys = sorted((r["person"], r["item"]) for r in a)
    fa = {(r["person"], r["item"]): r["value"] for r in a}
    fb = {(r["person"], r["item"]): r["value"] for r in b}
    ref = paired_difference([fb[k] for k in keys], [fa[k] for k in keys], [k[0] for k in keys])
    assert ours == ref
    assert "forget/cloze/textual" not in out  # nothing scored there: no difference invented
    same = report_dose.compare_rows({"items": a}, {"items": a}, cells=(("forget", "cloze"),))
    assert same["forget/cloze/visual"]["value"] == 0.0 and same["forget/cloze/visual"]["p_value"] == 1.0
    with pytest.raises(ValueError, match="different items"):
        report_dose.compare_rows({"items": a}, {"items": a[:-1]}, cells=(("forget", "cloze"),))


def _results(v):
    cell = {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": 40, "n_people": 10}
    return {s: {mode: {"cloze": cell, "option_acc": cell} for mode in report_dose.MODES}
            for s in ("forget", "retain", "real")}


def test_the_report_counts_the_doses_where_a_pair_differs(tmp_path):
    diff = lambda p: {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3, "p_value": p, "n": 40, "n_people": 10}
    study = {
        "learning_rate": 3e-4, "forget_people": 10, "steps": [10, 20],
        "references": {"Vanilla": {"results": _results(0.9)}, "Oracle": {"results": _results(0.1)}},
        "rows": [{"method": m, "steps": n, "results": _results(v)}
                 for m, v in (("ga", 0.5), ("npo", 0.7)) for n in (10, 20)],
        "comparisons": [{"first": "ga", "second": "npo", "steps": 10,
                         "differences": {"forget/cloze/visual": diff(0.5), "forget/cloze/textual": diff(0.01)}},
                        {"first": "ga", "second": "npo", "steps": 20,
                         "differences": {"forget/cloze/visual": diff(0.2), "forget/cloze/textual": diff(0.3)}}],
    }
    assert report_dose.significant_counts(study) == {("npo", "ga"): (1, 2)}
    assert report_dose.reference_levels(study, "forget", "cloze", "visual") == {"Vanilla": 0.9, "Oracle": 0.1}
    assert report_dose.reference_levels(study, "test", "cloze", "visual") == {}
    path = report_dose.write_dose_report(tmp_path, study, {"ga": "GA", "npo": "NPO"})
    text = path.read_text()
    assert "NPO − GA: 1 of 2 doses" in text and "**p=0.010**" in text
    assert "| NPO | 20 | 70.0 [60.0, 80.0]" in text and "| Oracle | – | 10.0 [0.0, 20.0]" in text
    assert "forget 10, retain 10, real 10" in text
    assert (tmp_path / "dose_study.png").stat().st_size > 0
