"""Shared vs unique facts: every VL-Eraser (and baseline) selection setting as progress to the Oracle vs worst
utility drop, on each benchmark's own 10 validation people.

Progress = 1 − distance / Vanilla's distance (0 = Vanilla, 1 = the Oracle), so the two benchmarks, whose Vanilla and
Oracle differ, share one axis. Cloze progress uses the cloze scores alone (no multiple-choice distractors in it).
Run from the repository root after the selections exist:
    python results/fact-specificity/compare.py SHARED_SELECTION_DIR UNIQUE_SELECTION_DIR OUT_DIR [METHOD ...]
"""

import json
import sys
from pathlib import Path

from vleraser_jax.eval.report_plots import pyplot, save_png


def _progress(row_forget, refs, metrics):
    """1 − Σ|score − Oracle| / Σ|Vanilla − Oracle| over `metrics` (over all of them: 1 − distance / Vanilla's)."""
    van, orc = refs["vanilla"]["forget"], refs["oracle"]["forget"]
    gap = sum(abs(van[m] - orc[m]) for m in metrics)
    return sum(abs(van[m] - orc[m]) - abs(row_forget[m] - orc[m]) for m in metrics) / gap


def rows_of(sel):
    refs = sel["references"]
    metrics = list(refs["vanilla"]["forget"])
    cloze = [m for m in metrics if m.startswith("cloze/")]
    out = []
    for i, r in enumerate(sel["rows"]):
        out.append({"setting": r["setting"], "progress": _progress(r["forget"], refs, metrics),
                    "cloze_progress": _progress(r["forget"], refs, cloze), "retain": r["drops"]["retain"],
                    "real": r["drops"]["real"], "worst": r["worst_drop"], "eligible": r["eligible"],
                    "chosen": i == sel["chosen"]})
    return out


def main(shared_dir, unique_dir, out_dir, *methods):
    methods = methods or ("vl_eraser",)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Shared vs unique facts: selection settings on validation people", "",
             "Progress to the Oracle (0 Vanilla, 1 Oracle) over cloze and option accuracy, both modes; cloze progress "
             "over cloze alone; drops in points of mean retain / real utility vs Vanilla. 10 validation people, 40 "
             "retain people, 20 celebrities per benchmark.", "", "![comparison](comparison.png)", ""]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method in methods:
        for tag, d, marker in (("shared", shared_dir, "o"), ("unique", unique_dir, "^")):
            sel = json.loads((Path(d) / f"{method}.json").read_text())
            refs = sel["references"]
            lines += [f"## {method}, {tag} facts", "",
                      f"Vanilla forget: {', '.join(f'{k} {v:.3f}' for k, v in refs['vanilla']['forget'].items())}; "
                      f"Oracle: {', '.join(f'{k} {v:.3f}' for k, v in refs['oracle']['forget'].items())}.", "",
                      "| setting | progress | cloze progress | retain drop | real drop | eligible |", "|---|---|---|---|---|---|"]
            rows = rows_of(sel)
            for r in rows:
                setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
                lines.append(f"| {setting}{' (chosen)' if r['chosen'] else ''} | {r['progress']:.2f} | "
                             f"{r['cloze_progress']:.2f} | {100 * r['retain']:+.1f} | {100 * r['real']:+.1f} | "
                             f"{'yes' if r['eligible'] else 'no'} |")
            lines.append("")
            ax.scatter([r["progress"] for r in rows], [100 * r["worst"] for r in rows], marker=marker, s=24,
                       label=f"{method}, {tag} facts")
    ax.axhline(5, color="grey", ls="--", lw=0.8, label="tolerance (5 pts)")
    ax.set_xlabel("progress to the Oracle on validation forget scores (0 = Vanilla, 1 = Oracle)")
    ax.set_ylabel("worst utility drop vs Vanilla, retain or real (points)")
    ax.set_title("Every selection setting, shared vs unique facts", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "comparison.png")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'comparison.md'} and comparison.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
