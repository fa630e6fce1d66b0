"""The report's plots (PNG, written atomically): forget vs utility per mode with Vanilla as the start and the
Oracle as the target, and per-set bars; on the informative metrics (cloze, option likelihood) by default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .report_format import MODE_TITLES, PERCENT_METRICS, SET_TITLES


CHANCE_METRICS = {"classification", "option_acc", "option_acc_norm"}  # four options: chance is 25%


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    plt = pyplot()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def plot_forget_vs_utility(methods: Mapping[str, Any], unlearning: Mapping[str, Any], path: Path,
                           metric: str = "cloze") -> None:
    """One panel per mode: forget `metric` (x, with its CI; lower = more forgotten) vs model utility (y, the
    harmonic mean of retain/real scores). Vanilla is where every method starts (arrows), the Oracle the target."""
    plt = pyplot()
    modes = [m for m in MODE_TITLES if any(m in u.get("model_utility", {}) for u in unlearning.values())]
    if not modes:
        return
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.8), squeeze=False)
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    for ax, mode in zip(axes[0], modes):
        points = {}
        for method, u in unlearning.items():
            f = methods.get(method, {}).get("forget", {}).get(mode, {}).get(metric)
            y = u.get("model_utility", {}).get(mode)
            if f and f.get("n") and y is not None:
                points[method] = (f, y)
        start = points.get("Vanilla")
        for method, (f, y) in points.items():
            x = f["value"] * scale
            style = {"Vanilla": dict(marker="s", color="black", ms=9), "Oracle": dict(marker="*", color="gold",
                                                                                     ms=16, mec="black")}
            kw = style.get(method, dict(marker="o"))
            ax.errorbar(x, y, xerr=[[x - f["ci_low"] * scale], [f["ci_high"] * scale - x]], capsize=3, ls="none",
                        label=method, **kw)
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            if start and method not in ("Vanilla", "Oracle"):
                ax.annotate("", (x, y), (start[0]["value"] * scale, start[1]),
                            arrowprops=dict(arrowstyle="->", color="grey", alpha=0.4, lw=0.8))
        if metric in CHANCE_METRICS:
            ax.axvline(25.0, color="grey", ls="--", lw=0.8, label="chance (4 options)")
        ax.set_xlabel(f"forget {metric}{' (%)' if scale == 100.0 else ''}  (lower = more forgotten)")
        ax.set_ylabel("model utility (harmonic mean, retain + real)")
        ax.set_title(MODE_TITLES[mode])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_png(fig, path)


def plot_sets(methods: Mapping[str, Any], path: Path, metric: str = "cloze", mode: str = "visual") -> None:
    """Grouped bars: each method's score on every set, with CI whiskers."""
    import numpy as np

    plt = pyplot()
    sets = [s for s in SET_TITLES if any(s in r for r in methods.values())]
    names = list(methods)
    width = 0.8 / max(len(names), 1)
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(sets) * max(1, len(names) / 3)), 4.2))
    for k, method in enumerate(names):
        vals, lows, highs = [], [], []
        for s in sets:
            e = methods[method].get(s, {}).get(mode, {}).get(metric)
            ok = e and e.get("n")
            vals.append(e["value"] * scale if ok else np.nan)
            lows.append((e["value"] - e["ci_low"]) * scale if ok else 0)
            highs.append((e["ci_high"] - e["value"]) * scale if ok else 0)
        ax.bar(np.arange(len(sets)) + k * width, vals, width, yerr=[lows, highs], capsize=2, label=method)
    if metric in CHANCE_METRICS:
        ax.axhline(25.0, color="grey", ls="--", lw=0.8, label="chance (4 options)")
    ax.set_xticks(np.arange(len(sets)) + width * (len(names) - 1) / 2, [SET_TITLES[s] for s in sets])
    ax.set_ylabel(f"{metric}{' (%)' if scale == 100.0 else ''}")
    ax.set_title(f"{metric} by set — {MODE_TITLES[mode]}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
