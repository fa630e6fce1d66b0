"""The selection report: for every method, its budget of settings on the validation people, which one was chosen
(or that none was eligible), and the forget–utility frontier, as a table and a plot (`selection.md`,
`selection.png`). Input: the selection results `experiment.sweep.run_sweep` writes, as plain dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..io import write_text_atomic
from .report_plots import pyplot, save_png


def _setting(setting: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(setting.items()))


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}" if x == x else "–"


def method_table(name: str, sel: Mapping[str, Any]) -> list[str]:
    """One method's rows: every setting, its distance to the Oracle and utility drops; chosen and frontier marked."""
    refs = sel["references"]
    lines = [f"### {name}", "",
             f"{len(sel['rows'])} settings (budget {sel['budget']}) on {sel['validation_people']} validation people, "
             f"retain scored on {sel['retain_people']} people; eligible: retain and real within "
             f"{100 * sel['tolerance']:.0f} points of Vanilla. Vanilla's distance to the Oracle: "
             f"{refs['oracle']['vanilla_distance']:.3f}. **{sel['reason']}**"
             + (f": `{_setting(sel['rows'][sel['chosen']]['setting'])}`." if sel["chosen"] is not None else ".")
             + _reported_as(sel), "",
             "| setting | distance to Oracle | retain drop (pts) | real drop (pts) | eligible | frontier |",
             "|---|---|---|---|---|---|"]
    front = set(sel["frontier"])
    for i, row in enumerate(sel["rows"]):
        mark = " **(chosen)**" if i == sel["chosen"] else ""
        lines.append(f"| `{_setting(row['setting'])}`{mark} | {row['distance']:.3f} | "
                     f"{_pct(row['drops'].get('retain', float('nan')))} | {_pct(row['drops'].get('real', float('nan')))} | "
                     f"{'yes' if row['eligible'] else 'no'} | {'yes' if i in front else ''} |")
    return lines + [""]


def _reported_as(sel: Mapping[str, Any]) -> str:
    """" The reported run applies it as `k=v`." where the chosen row's run setting differs from its setting."""
    if sel["chosen"] is None:
        return ""
    row = sel["rows"][sel["chosen"]]
    run = row.get("run_setting")
    if run is None or run == row["setting"]:
        return ""
    return (f" The reported run applies it as `{_setting({k: v for k, v in run.items() if v is not None})}` (the "
            "optimizer steps it ran on the validation people).")


def plot_selection(selections: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Distance to the Oracle (x) vs worst utility drop (y) of every setting, one colour per method, the frontier
    joined, the tolerance drawn; Vanilla sits at (its distance, 0)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    tolerance = None
    for name, sel in selections.items():
        rows = sel["rows"]
        line = ax.scatter([r["distance"] for r in rows], [100 * r["worst_drop"] for r in rows], s=18, label=name)
        front = sorted((rows[i] for i in sel["frontier"]), key=lambda r: r["distance"])
        ax.plot([r["distance"] for r in front], [100 * r["worst_drop"] for r in front], color=line.get_facecolor()[0],
                lw=1, alpha=0.7)
        if sel["chosen"] is not None:
            r = rows[sel["chosen"]]
            ax.scatter([r["distance"]], [100 * r["worst_drop"]], s=90, facecolors="none", edgecolors="black")
        tolerance = sel["tolerance"]
        vanilla_distance = sel["references"]["oracle"]["vanilla_distance"]
    if selections:
        ax.scatter([vanilla_distance], [0.0], marker="s", color="black", s=50, label="Vanilla")
        ax.axhline(100 * tolerance, color="grey", ls="--", lw=0.8, label=f"tolerance ({100 * tolerance:.0f} pts)")
    ax.set_xlabel("distance to the Oracle on the validation people's forget scores (0 = the Oracle)")
    ax.set_ylabel("worst utility drop vs Vanilla, retain or real (points)")
    ax.set_title("Selection on validation people: every setting\nlines = each method's frontier; circled = chosen", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def write_selection_report(out_dir, selections: Mapping[str, Mapping[str, Any]], titles: Mapping[str, str]) -> Path:
    """selection.md (+ selection.png) in `out_dir`; returns the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Selection on validation people", "",
             "Every method gets the same number of settings, scored on retain people the Oracle was retrained without "
             "(never the reported forget people). Distance = mean |forget score − Oracle's| over cloze and option-"
             "likelihood accuracy, both modes; utility = mean of the same metrics on retain / real. A chosen GA, GD, "
             "KL or NPO setting runs on the reported forget people at the optimizer steps it ran here (each method's "
             "line says so where that differs from its setting).", "",
             "![selection](selection.png)", ""]
    for method, sel in selections.items():
        lines += method_table(titles.get(method, method), sel)
    plot_selection({titles.get(m, m): s for m, s in selections.items()}, out / "selection.png")
    return write_text_atomic(out / "selection.md", "\n".join(lines))
