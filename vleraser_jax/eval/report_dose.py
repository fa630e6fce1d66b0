"""The matched-dose report: methods run at the same learning rate and optimizer steps on the same people, each
method's scores per dose and the paired, person-level differences between methods at equal dose
(`dose_study.md`, `dose_study.png`). Input: the plain dict `experiment.dose_study.run_dose_study` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import write_text_atomic
from .report_plots import pyplot, save_png
from .statistics import pair_items, paired_difference

# (set, metric) shown per method and compared between methods; both modes of each
DOSE_CELLS = (("forget", "cloze"), ("forget", "option_acc"), ("retain", "cloze"), ("retain", "option_acc"),
              ("real", "cloze"))
MODES = ("visual", "textual")


def _cell(results: Mapping, set_name: str, metric: str, mode: str) -> Mapping | None:
    return results.get(set_name, {}).get(mode, {}).get(metric)


def _pct_ci(entry: Mapping | None) -> str:
    if entry is None:
        return "–"
    return f"{100 * entry['value']:.1f} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"


def _people(results: Mapping, set_name: str) -> int:
    counts = [m.get("n_people", 0) for modes in [results.get(set_name, {})] for metrics in modes.values()
              for m in metrics.values()]
    return max(counts, default=0)


def compare_rows(first: Mapping, second: Mapping, cells=DOSE_CELLS, seed: int = 0) -> dict:
    """{"<set>/<metric>/<mode>": paired difference second − first} over the items both scored, clustered by person
    (bootstrap interval over people, person-level permutation p). first/second: {"items": [...]} rows."""
    out = {}
    for set_name, metric in cells:
        for mode in MODES:
            b, a, people = pair_items(second["items"], first["items"], set_name, mode, metric)
            if a:
                out[f"{set_name}/{metric}/{mode}"] = paired_difference(b, a, people, seed=seed)
    return out


def _diff(entry: Mapping | None) -> str:
    if entry is None:
        return "–"
    p = entry["p_value"]
    p_text = "p<0.001" if p < 0.001 else f"p={p:.3f}"
    return (f"{100 * entry['value']:+.1f} [{100 * entry['ci_low']:+.1f}, {100 * entry['ci_high']:+.1f}] "
            f"{'**' + p_text + '**' if p < 0.05 else p_text}")


def scores_table(study: Mapping[str, Any], titles: Mapping[str, str]) -> list[str]:
    """Every run's scores: one row per method and dose, with the references first."""
    head = " | ".join(f"{s} {m.replace('option_acc', 'option-LL')} vis / txt" for s, m in DOSE_CELLS)
    lines = [f"| model | steps | {head} |", "|---|---|" + "---|" * len(DOSE_CELLS)]
    rows = [(name, "–", ref) for name, ref in study["references"].items()]
    rows += [(titles.get(r["method"], r["method"]), str(r["steps"]), r) for r in study["rows"]]
    for name, steps, row in rows:
        cells = [" / ".join(_pct_ci(_cell(row["results"], s, m, mode)) for mode in MODES) for s, m in DOSE_CELLS]
        lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
    return lines


def comparison_table(study: Mapping[str, Any], titles: Mapping[str, str]) -> list[str]:
    """method B − method A at each dose, paired on the same people and items."""
    cols = [(s, m, mode) for s, m in DOSE_CELLS for mode in MODES]
    head = " | ".join(f"{s} {m.replace('option_acc', 'option-LL')} {mode[:3]}" for s, m, mode in cols)
    lines = [f"| steps | difference | {head} |", "|---|---|" + "---|" * len(cols)]
    for cmp in study["comparisons"]:
        name = f"{titles.get(cmp['second'], cmp['second'])} − {titles.get(cmp['first'], cmp['first'])}"
        diffs = cmp["differences"]
        lines.append(f"| {cmp['steps']} | {name} | " + " | ".join(_diff(diffs.get(f"{s}/{m}/{mode}"))
                                                                for s, m, mode in cols) + " |")
    return lines


def significant_counts(study: Mapping[str, Any], cell: str = "forget/cloze", alpha: float = 0.05
                       ) -> dict[tuple[str, str], tuple[int, int]]:
    """{(B, A): (k, n)}: at k of the n doses the pair B − A differs on `cell` (either mode) at level alpha."""
    out: dict[tuple[str, str], list[int]] = {}
    for cmp in study["comparisons"]:
        hits = [cmp["differences"].get(f"{cell}/{mode}", {}).get("p_value", 1.0) < alpha for mode in MODES]
        out.setdefault((cmp["second"], cmp["first"]), []).append(int(any(hits)))
    return {k: (sum(v), len(v)) for k, v in out.items()}


def reference_levels(study: Mapping[str, Any], set_name: str, metric: str, mode: str) -> dict[str, float]:
    """{reference name: its score} for one cell (the plot's horizontal lines)."""
    cells = {name: _cell(ref["results"], set_name, metric, mode) for name, ref in study["references"].items()}
    return {name: cell["value"] for name, cell in cells.items() if cell is not None}


def plot_dose_study(study: Mapping[str, Any], titles: Mapping[str, str], path: Path,
                    panels: Sequence[tuple[str, str]] = (("forget", "cloze"), ("retain", "cloze"))) -> None:
    """Score vs optimizer steps, one line per method with its person-level 95% band; Vanilla and the Oracle as
    horizontal lines; one column per (set, metric), one row per mode."""
    plt = pyplot()
    fig, axes = plt.subplots(len(MODES), len(panels), figsize=(5.2 * len(panels), 7), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in study["rows"]))
    for col, (set_name, metric) in enumerate(panels):
        for row_i, mode in enumerate(MODES):
            ax = axes[row_i][col]
            for method in methods:
                rows = sorted((r for r in study["rows"] if r["method"] == method), key=lambda r: r["steps"])
                cells = [_cell(r["results"], set_name, metric, mode) for r in rows]
                steps = [r["steps"] for r, e in zip(rows, cells) if e is not None]
                cells = [e for e in cells if e is not None]
                line, = ax.plot(steps, [100 * e["value"] for e in cells], marker="o", label=titles.get(method, method))
                ax.fill_between(steps, [100 * e["ci_low"] for e in cells], [100 * e["ci_high"] for e in cells],
                                color=line.get_color(), alpha=0.15)
            for name, value in reference_levels(study, set_name, metric, mode).items():
                ax.axhline(100 * value, color="black", ls="--" if name == "Vanilla" else ":", lw=0.9, label=name)
            ax.set_title(f"{set_name} {metric.replace('option_acc', 'option-LL')}, {mode}", fontsize=10)
            ax.set_xlabel("optimizer steps (same learning rate for every method)")
            ax.set_ylabel("% correct")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Matched doses at learning rate {study['learning_rate']:g}: bands are 95% CIs over people", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)


def write_dose_report(out_dir, study: Mapping[str, Any], titles: Mapping[str, str]) -> Path:
    """dose_study.md (+ dose_study.png) in `out_dir`; returns the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refs = study["references"]["Vanilla"]["results"]
    counts = ", ".join(f"{s} {_people(refs, s)}" for s in ("forget", "retain", "real"))
    lines = ["# Methods at matched doses", "",
             f"Every method at learning rate {study['learning_rate']:g} and the same optimizer steps on the reported "
             f"forget people ({study['forget_people']}); scored on cloze and option-likelihood accuracy, both modes. "
             f"People per set: {counts}. Brackets: 95% CI from resampling people. Differences are paired on the same "
             "people and items, with a person-level permutation p (bold: p < 0.05). This is a comparison of the "
             "methods' update rules at equal dose, not a selection: no setting is chosen here.", "",
             "![dose study](dose_study.png)", "", "## Scores", ""]
    lines += scores_table(study, titles)
    lines += ["", "## Paired differences at equal dose (points)", ""]
    lines += comparison_table(study, titles)
    lines += ["", "Doses at which a pair differs on forget cloze (either mode, p < 0.05): "
              + "; ".join(f"{titles.get(b, b)} − {titles.get(a, a)}: {k} of {n} doses"
                          for (b, a), (k, n) in significant_counts(study).items()) + ".", ""]
    plot_dose_study(study, titles, out / "dose_study.png")
    return write_text_atomic(out / "dose_study.md", "\n".join(lines))
