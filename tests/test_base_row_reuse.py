"""The Base row of a report is reused only under its own evaluation key (settings and the base model's directory),
not the report-level key, which follows the references and is rewritten before the Base row is looked at."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vleraser_jax.eval.evaluate import EvalConfig
from vleraser_jax.eval.report import load_results, write_report
from vleraser_jax.experiment import pipeline


def results(value: float) -> dict:
    entry = {"value": value, "ci_low": max(value - 0.1, 0.0), "ci_high": min(value + 0.1, 1.0), "n": 4}
    return {s: {m: {"cloze": entry} for m in ("visual", "textual")} for s in ("forget", "retain")}


ITEMS = [{"set": "forget", "mode": "visual", "metric": "cloze", "person": "p1", "item": "cloze0", "value": 1.0}]


@dataclasses.dataclass
class FakeExperiment:
    report_dir: Path
    ecfg: EvalConfig
    value: float
    meta: dict = dataclasses.field(default_factory=dict)
    scored: int = 0

    def score(self, params):
        self.scored += 1
        return results(self.value), ITEMS, None

    def summary(self, results, items, membership):
        return {"n_people": 1}


def test_base_row_is_evaluated_again_when_its_own_key_changes(tmp_path):
    base_dir = tmp_path / "models" / "base-1"
    first = FakeExperiment(tmp_path / "report", EvalConfig(length_bucket=32), 0.2)
    first.meta = {"model": "tiny", "eval_key": "refs-1"}
    pipeline._score_once(first, "Base", base_dir, lambda: None, log=lambda *_: None)
    assert first.scored == 1

    same = FakeExperiment(first.report_dir, EvalConfig(length_bucket=32), 0.9, dict(first.meta))
    pipeline._score_once(same, "Base", base_dir, lambda: None, log=lambda *_: None)
    assert same.scored == 0  # same settings, same model: reused
    assert load_results(first.report_dir)["Base"]["forget"]["visual"]["cloze"]["value"] == 0.2

    # the references were just rewritten under the new report-level key (what a changed setting does first)
    changed = FakeExperiment(first.report_dir, EvalConfig(length_bucket=16), 0.7, {"model": "tiny", "eval_key": "refs-2"})
    write_report(changed.report_dir, "Vanilla", results(0.95), changed.meta, items=ITEMS)
    pipeline._score_once(changed, "Base", base_dir, lambda: None, log=lambda *_: None)
    assert changed.scored == 1
    assert load_results(first.report_dir)["Base"]["forget"]["visual"]["cloze"]["value"] == 0.7

    other_base = FakeExperiment(first.report_dir, EvalConfig(length_bucket=16), 0.4, dict(changed.meta))
    pipeline._score_once(other_base, "Base", tmp_path / "models" / "base-2", lambda: None, log=lambda *_: None)
    assert other_base.scored == 1
