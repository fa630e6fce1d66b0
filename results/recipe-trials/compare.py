"""A cheaper training recipe's reference rows beside two trainings of the demo's recipe, cell by cell.

    python results/recipe-trials/compare.py results/tiny_llava-forget15/results.json \
        results/tiny_llava-forget15-rerun/results.json results/recipe-trials/base1500.results.json Vanilla Oracle Base GA

A and B: two trainings of the full recipe (the first report and its rerun, different float rounding). C: the
trial. Per model: the mean and largest absolute difference over its 32 headline cells (4 sets x 2 modes x cloze,
option-likelihood accuracy, letter classification, ROUGE-L; points), A vs B (what a retraining moves) beside C vs
B and C vs A; then its cloze and option-likelihood cells in the three. A cheaper recipe measures the same
knowledge when C stays as close to A and B as they are to each other.
"""

import json
import sys

SETS = ("forget", "test", "retain", "real")
MODES = ("visual", "textual")
METRICS = ("cloze", "option_acc", "classification", "rougeL")


def cells(report, model):
    out = {}
    for s in SETS:
        for mode in MODES:
            for metric in METRICS:
                cell = report["methods"].get(model, {}).get(s, {}).get(mode, {}).get(metric)
                if cell is not None:
                    out[(s, mode, metric)] = 100 * cell["value"]
    return out


def gaps(x, y, keys):
    diffs = [abs(x[k] - y[k]) for k in keys]
    return f"{sum(diffs) / len(diffs):.1f} (max {max(diffs):.1f})"


def main(a_path, b_path, c_path, *models):
    a, b, c = (json.load(open(p)) for p in (a_path, b_path, c_path))
    print("| model | cells | mean abs A−B (max) | C−B | C−A |")
    print("|---|---|---|---|---|")
    details = []
    for model in models:
        A, B, C = cells(a, model), cells(b, model), cells(c, model)
        keys = sorted(set(A) & set(B) & set(C))
        print(f"| {model} | {len(keys)} | {gaps(A, B, keys)} | {gaps(C, B, keys)} | {gaps(C, A, keys)} |")
        details += [f"| {model} | {s} {mode} {metric} | {A[s, mode, metric]:.1f} | {B[s, mode, metric]:.1f} | "
                    f"{C[s, mode, metric]:.1f} |" for s, mode, metric in keys if metric in ("cloze", "option_acc")]
    print("\n| model | cell | A | B | C |\n|---|---|---|---|---|")
    print("\n".join(details))


if __name__ == "__main__":
    main(*sys.argv[1:])
