"""The demo's report from two trainings of the same recipe, cell by cell: how far retraining moves each number.

    python results/tiny_llava-forget15-rerun/compare.py results/tiny_llava-forget15/results.json \
        results/tiny_llava-forget15-rerun/results.json > results/tiny_llava-forget15-rerun/compared.md

The first report's models were trained by the code up to 4226a03, the second's by the code since 77345a4 (Dense's
rows product and the schedule in the optimizer state: the same recipe and data, different float rounding, so
after 7200 training steps different models). Per method: forget cloze and option-likelihood accuracy (visual /
textual) in both, progress to each report's own Oracle, the worst paired retain / real drop vs each report's own
Vanilla, and how many of the method's 32 headline cells (4 sets x 2 modes x cloze, option, classification,
ROUGE-L) of the second report fall inside the first report's 95% person-level CI.
"""

import json
import sys

SETS = ("forget", "test", "retain", "real")
MODES = ("visual", "textual")
METRICS = ("cloze", "option_acc", "classification", "rougeL")


def value(report, method, s, mode, metric):
    return report["methods"][method][s][mode][metric]["value"]


def progress(report, method, mode, metric):
    van, orc = (value(report, m, "forget", mode, metric) for m in ("Vanilla", "Oracle"))
    return (van - value(report, method, "forget", mode, metric)) / (van - orc)


def worst_drop(report, method):
    """The largest fall (points) of retain or real cloze / option accuracy vs Vanilla, over both modes."""
    return max(100 * (value(report, "Vanilla", s, mode, m) - value(report, method, s, mode, m))
               for s in ("retain", "real") for mode in MODES for m in ("cloze", "option_acc"))


def inside(first, second, method):
    n = hits = 0
    for s in SETS:
        for mode in MODES:
            for metric in METRICS:
                cell = first["methods"][method][s][mode].get(metric)
                if cell is None:
                    continue
                n += 1
                hits += cell["ci_low"] <= value(second, method, s, mode, metric) <= cell["ci_high"]
    return hits, n


def main(first_path, second_path):
    first, second = (json.load(open(p)) for p in (first_path, second_path))
    pct = lambda r, m, metric: " / ".join(f"{100 * value(r, m, 'forget', mode, metric):.1f}" for mode in MODES)
    prog = lambda r, m, metric: " / ".join(f"{progress(r, m, mode, metric):.2f}" for mode in MODES)
    print("| Method | forget cloze % vis / txt: first → second | forget option-LL % | progress to Oracle (cloze) | "
          "worst retain/real drop (pts) | second's cells inside first's CI |")
    print("|---|---|---|---|---|---|")
    total_hits = total_n = 0
    for method in first["methods"]:
        hits, n = inside(first, second, method)
        total_hits, total_n = total_hits + hits, total_n + n
        drops = "—" if method == "Vanilla" else f"{worst_drop(first, method):+.1f} → {worst_drop(second, method):+.1f}"
        print(f"| {method} | {pct(first, method, 'cloze')} → {pct(second, method, 'cloze')} | "
              f"{pct(first, method, 'option_acc')} → {pct(second, method, 'option_acc')} | "
              f"{prog(first, method, 'cloze')} → {prog(second, method, 'cloze')} | {drops} | {hits} of {n} |")
    print(f"\nAll methods: {total_hits} of {total_n} cells ({100 * total_hits / total_n:.0f}%) inside the first "
          "report's CIs.")


if __name__ == "__main__":
    main(*sys.argv[1:3])
