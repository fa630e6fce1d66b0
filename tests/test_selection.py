"""The selection protocol's arithmetic: scores, eligibility, the frontier, the budget, "nothing eligible"."""

from __future__ import annotations

import pytest

from vleraser_jax.experiment import sweep


def results(forget, retain, real):
    """Evaluation results with the same value for every selection metric and mode of a set."""
    block = lambda v: {mode: {m: {"value": v} for m in sweep.SELECTION_METRICS} for mode in ("visual", "textual")}
    return {"forget": block(forget), "retain": block(retain), "real": block(real)}


def test_distance_and_drops():
    vanilla, oracle = results(0.9, 0.8, 0.9), results(0.1, 0.8, 0.9)
    assert sweep.distance_to(vanilla, oracle) == pytest.approx(0.8)
    assert sweep.distance_to(results(0.3, 0.7, 0.9), oracle) == pytest.approx(0.2)
    assert sweep.utility_drops(results(0.3, 0.7, 0.95), vanilla) == pytest.approx({"retain": 0.1, "real": -0.05})
    with pytest.raises(ValueError, match="selection metric"):
        sweep.distance_to({"forget": {}}, oracle)


def row(distance, worst, eligible):
    return {"distance": distance, "worst_drop": worst, "eligible": eligible}


def test_choice_is_the_eligible_setting_closest_to_the_oracle():
    rows = [row(0.5, 0.01, True), row(0.2, 0.04, True), row(0.1, 0.2, False), row(0.6, 0.02, True)]
    out = sweep.choose(rows)
    assert out["chosen"] == 1 and out["eligible"] == 3
    assert out["frontier"] == [0, 1, 2]  # row 3 is beaten by row 0 on both axes


def test_nothing_eligible_chooses_nothing_and_keeps_the_frontier():
    rows = [row(0.5, 0.1, False), row(0.2, 0.3, False), row(0.6, 0.2, False)]
    out = sweep.choose(rows)
    assert out["chosen"] is None and out["eligible"] == 0 and "nothing is chosen" in out["reason"]
    assert out["frontier"] == [0, 1]


def test_every_method_gets_exactly_the_budget():
    grid = {"a": [1, 2, 3], "b": [0.1, 0.2, 0.3, 0.4, 0.5]}
    picked = sweep.expand_grid(grid, 12, seed=0)
    assert len(picked) == 12 and len({tuple(sorted(p.items())) for p in picked}) == 12
    assert picked == sweep.expand_grid(grid, 12, seed=0)  # seeded
    assert len(sweep.expand_grid({"a": [1, 2, 3, 4], "b": [1, 2, 3]}, 12)) == 12
    with pytest.raises(ValueError, match="budget is 12"):
        sweep.expand_grid({"a": [1, 2]}, 12)


def test_finished_trials_survive_a_cut_off_line(tmp_path):
    import ml_collections

    c = ml_collections.ConfigDict({"work_dir": str(tmp_path), "name": "t", "data": {"forget_ratio": 15}})
    sweep.record_row(c, "ga", "a1", {"distance": 0.5})
    sweep.record_row(c, "ga", "b2", {"distance": 0.25})
    path = sweep.trials_path(c, "ga")
    path.write_text(path.read_text() + '{"id": "c3", "ro')  # a run killed mid-write
    assert sweep.finished_rows(c, "ga") == {"a1": {"distance": 0.5}, "b2": {"distance": 0.25}}
    assert sweep.finished_rows(c, "npo") == {}


def test_the_report_header_says_when_the_config_does_not_run_the_selected_setting():
    from pathlib import Path

    from vleraser_jax.config import load_config
    from vleraser_jax.experiment.methods import effective_settings
    from vleraser_jax.experiment.runner import config_mismatch

    c = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny_llava.py")
    running = effective_settings(c, "ga")
    same = {"learning_rate": running["learning_rate"], "epochs": running["epochs"]}
    other = {**same, "learning_rate": running["learning_rate"] * 10}
    assert config_mismatch(c, "ga", {"chosen": 0, "rows": [{"setting": same}]}) == ""
    text = config_mismatch(c, "ga", {"chosen": 0, "rows": [{"setting": other}]})
    assert "learning_rate" in text and "epochs" not in text
    assert config_mismatch(c, "ga", {"chosen": None, "rows": [{"setting": other}]}) == ""
    vle = effective_settings(c, "vl_eraser_paper")
    assert vle["vacuum_source"] == "image" and vle["deletion_strength"] == c.vl_eraser_paper.deletion_strength


def test_a_fresh_work_dir_reports_the_committed_selection_and_prefers_its_own(tmp_path):
    import json
    from pathlib import Path

    from vleraser_jax.config import load_config
    from vleraser_jax.experiment.runner import committed_selection_dir, selection_dir, selection_summary

    repo = Path(__file__).resolve().parent.parent
    c = load_config(repo / "configs" / "tiny_llava.py", [f"--config.work_dir={tmp_path}"])
    committed = json.loads((repo / "results" / "tiny_llava-forget15" / "selection" / "ga.json").read_text())
    assert committed_selection_dir(c) == repo / "results" / "tiny_llava-forget15" / "selection"
    header = selection_summary(c, ["ga"])
    assert f"ga: chosen of {len(committed['rows'])} ({committed['eligible']} eligible)" in header
    assert "committed (this run did not select)" in header and "but the config runs" not in header
    own = {**committed, "eligible": 0, "chosen": None}  # a selection run in this work dir wins
    selection_dir(c).mkdir(parents=True)
    (selection_dir(c) / "ga.json").write_text(json.dumps(own))
    assert selection_summary(c, ["ga"]) == (f"ga: none of {len(committed['rows'])} eligible, frontier shown — "
                                            "every setting in selection/selection.md")
    other = load_config(repo / "configs" / "tiny_llava.py", [f"--config.work_dir={tmp_path}", "--config.name=x"])
    assert committed_selection_dir(other) is None
    assert selection_summary(other, ["ga"]) == "the config's settings (no selection results in selection/)"


@pytest.mark.parametrize("backbone", ["tiny_llava", "tiny_qwen2vl"])
def test_each_shipped_tiny_config_runs_its_committed_selection(backbone):
    from pathlib import Path

    from vleraser_jax.config import load_config
    from vleraser_jax.experiment.runner import committed_selection_dir, config_mismatch, load_selections

    c = load_config(Path(__file__).resolve().parent.parent / "configs" / f"{backbone}.py")
    root = committed_selection_dir(c)
    assert root is not None, f"no committed selection for {backbone}"
    selections = load_selections(c, root)
    assert len(selections) == 7
    mismatches = {m: config_mismatch(c, m, sel) for m, sel in selections.items()}
    assert all(text == "" for text in mismatches.values()), mismatches


def test_a_setting_travels_as_the_optimizer_steps_it_ran_on_the_validation_people():
    from pathlib import Path
    from types import SimpleNamespace

    from vleraser_jax.config import load_config
    from vleraser_jax.experiment.methods import baseline_method_config, with_method_settings
    from vleraser_jax.unlearn.baselines import run_plan

    c = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny_llava.py")
    validation = SimpleNamespace(forget_train=[None] * 150, retain_train=[None] * 1125)  # 10 people, batch 4
    setting = {"learning_rate": 3e-4, "epochs": 3.0}
    moved = sweep.run_setting(c, "ga", setting, validation)
    assert moved == {"learning_rate": 3e-4, "epochs": None, "steps": 3 * 38}  # 38 batches of 150 rows, 3 times

    def steps_on(s, forget_rows, retain_rows):
        _, cfg, run = baseline_method_config(with_method_settings(c, "ga", s), "ga")
        return len(run_plan(cfg, run, forget_rows, retain_rows))

    assert steps_on(setting, 225, 1275) == 3 * 57  # the same epochs over 15 people: 1.5x the steps
    assert steps_on(moved, 225, 1275) == steps_on(moved, 150, 1125) == 114
    # MMUnlearner's interleaving reads the retain rows too: 282 retain steps with 38 forget steps among them; its
    # plan is laid out from both sets' sizes, so it keeps its epochs
    assert sweep.optimizer_steps(c, "mmunlearner", {"epochs": 1.0}, validation) == 282 + 38
    assert sweep.run_setting(c, "mmunlearner", {"epochs": 1.0}, validation) == {"epochs": 1.0}
    vle = {"deletion_strength": 1.0, "threshold": 0.99}
    assert sweep.run_setting(c, "vl_eraser", vle, validation) == vle  # VL-Eraser counts steps already
    assert sweep.optimizer_steps(c, "vl_eraser", vle, validation) == c.vl_eraser.steps


def test_restating_a_stored_selection_adds_run_settings_and_keeps_the_choice(tmp_path, monkeypatch):
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from vleraser_jax.config import load_config
    from vleraser_jax.eval.report_selection import method_table
    from vleraser_jax.experiment.runner import config_mismatch, selection_dir

    c = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny_llava.py",
                    [f"--config.work_dir={tmp_path}", "--config.name=restate"])
    validation = SimpleNamespace(forget_train=[None] * 150, retain_train=[None] * 1125)
    monkeypatch.setattr(sweep, "prepare_data", lambda c, log: None)
    monkeypatch.setattr(sweep.mllmu, "load_benchmark", lambda root, ratio: "benchmark")
    monkeypatch.setattr(sweep, "validation_benchmark", lambda bench, people, seed: validation)
    rows = [{"setting": {"learning_rate": lr, "epochs": 1.0}, "distance": d, "drops": {"retain": 0.0, "real": 0.0},
             "worst_drop": 0.0, "eligible": True} for lr, d in ((1e-4, 0.5), (1e-3, 0.3))]
    stored = {"method": "npo", "budget": 2, "tolerance": 0.05, "validation_people": 10, "retain_people": 40,
              "references": {"oracle": {"vanilla_distance": 0.6}}, "rows": rows, **sweep.choose(rows)}
    with pytest.raises(FileNotFoundError, match="npo"):
        sweep.restate_selection(c, "npo", log=lambda *_: None)
    selection_dir(c).mkdir(parents=True)
    (selection_dir(c) / "npo.json").write_text(json.dumps(stored))
    out = sweep.restate_selection(c, "npo", log=lambda *_: None)
    assert out["chosen"] == 1 and json.loads((selection_dir(c) / "npo.json").read_text()) == out
    assert [r["run_setting"] for r in out["rows"]] == [{"learning_rate": lr, "epochs": None, "steps": 38}
                                                       for lr in (1e-4, 1e-3)]
    # the shipped config runs NPO at lr 1e-3 and 38 steps: the restated choice, not the epoch setting
    assert config_mismatch(c, "npo", out) == ""
    assert "epochs" in config_mismatch(c, "npo", stored)
    assert "reported run applies it as `learning_rate=0.001, steps=38`" in "\n".join(method_table("NPO", out))
