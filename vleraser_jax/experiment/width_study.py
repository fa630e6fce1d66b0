"""Does the room for a selective deletion grow with the FFN width? The vacuum study (vacuum_study.py) repeated on
vanilla models that differ only in the LM's `intermediate_size` (the width W_down's keys live in), with each
model's own knowledge of the people measured, so a reader sees whether a width's numbers describe facts it
learned.

Per width and vacuum source/energy, averaged over the LM blocks: the share of the key space the retain
statistics keep (k / d_ff), the forget people's answer-key energy outside that span, the same for the retain
people's other rows, and their ratio (the selectivity a vacuum-confined deletion can have at best; 1 = none).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import mllmu
from ..data.splits import validation_benchmark
from ..eval.evaluate import evaluate
from ..eval.report_plots import pyplot, save_png
from ..models.configs import ConfigError
from ..processing import load_processor
from ..train.stages import run_stage
from ..train.workspace import data_root
from .methods import eval_config
from .overview import stage_plan
from .pipeline import load_vanilla
from .vacuum_study import StudyRow, vacuum_energy_study

KNOWLEDGE_SETS = ("forget", "retain")
KNOWLEDGE_MODES = ("visual", "textual")


@dataclasses.dataclass(frozen=True)
class WidthRow:
    width: int
    source: str
    pooling: str
    energy: float
    blocks: int
    retained_fraction: float  # mean over blocks of k / d_ff
    forget_outside: float  # mean over blocks
    retain_outside: float
    heldout_outside: float

    @property
    def selectivity(self) -> float:
        return self.forget_outside / max(self.retain_outside, 1e-12)


def summarize_width(width: int, rows: Sequence[StudyRow]) -> list[WidthRow]:
    """One WidthRow per (source, pooling, energy) of one width's study rows, block averages."""
    groups: dict[tuple, list[StudyRow]] = {}
    for r in rows:
        groups.setdefault((r.source, r.pooling, r.energy), []).append(r)
    mean = lambda xs: float(np.mean(xs))
    return [WidthRow(width, source, pooling, energy, len(g), mean([r.retained / width for r in g]),
                     mean([r.forget_outside for r in g]), mean([r.retain_outside for r in g]),
                     mean([r.heldout_outside for r in g]))
            for (source, pooling, energy), g in groups.items()]


def knowledge_scores(results: dict) -> dict[str, dict]:
    """{"forget/visual": cloze score dict (value, CI, people), ...} from an evaluate() result."""
    return {f"{s}/{m}": results[s][m]["cloze"] for s in KNOWLEDGE_SETS for m in KNOWLEDGE_MODES
            if "cloze" in results.get(s, {}).get(m, {})}


def config_at_width(c, width: int):
    """The config with its LM's FFN width set to `width`: only for models trained from scratch here."""
    if c.model.get("checkpoint"):
        raise ConfigError(f"model.checkpoint={c.model.checkpoint!r}: a pretrained model's FFN width is fixed; the width "
                         "study trains its models from scratch (configs/tiny_*.py)")
    if int(width) != width or width < 1:
        raise ConfigError(f"--widths: {width!r} is not a positive whole FFN width (model.intermediate_size)")
    d = copy.deepcopy(c)
    d.model.intermediate_size = int(width)
    return d


def vanilla_on_validation(c, log=print):
    """(model, params, processor, validation split) of the config's vanilla model, trained unless cached."""
    vanilla_dir = run_stage(c, "vanilla", log=log)
    model, params, _ = load_vanilla(c, vanilla_dir)
    bench = validation_benchmark(mllmu.load_benchmark(data_root(c), c.data.forget_ratio), c.data.validation_people,
                                 c.seed)
    return model, params, load_processor(vanilla_dir), bench


def describe_width_study(c, widths: Sequence[int]) -> str:
    """What the study will do, said before it starts: per width, each stage trained (with its steps) or reused."""
    lines = [f"FFN width study at d_ff {', '.join(map(str, widths))}: per width a vanilla model, its cloze "
             "knowledge, and the vacuum study"]
    for width in widths:
        plan = stage_plan(config_at_width(c, width))
        lines.append(f"  d_ff {width}: " + ", ".join(f"{stage} {what}" + (f" ({steps} steps)" if what == "train" else "")
                                                   for stage, what, steps in plan))
    return "\n".join(lines)


def run_width_study(c, widths: Sequence[int], *, heldout_people: int = 10, max_people: int = 40, log=print,
                    progress: bool = True) -> tuple[dict[int, list[StudyRow]], dict[int, dict]]:
    """Per width: train (or reuse) its vanilla, score its cloze knowledge of the validation people and of up to
    `max_people` retain people, and run the vacuum study. Returns ({width: study rows}, {width: knowledge})."""
    studies, knowledge = {}, {}
    configs = {width: config_at_width(c, width) for width in widths}  # every width checked before any training
    for width, cw in configs.items():
        log(f"FFN width {width}: training (or reusing) its vanilla model")
        model, params, processor, bench = vanilla_on_validation(cw, log=log)
        ecfg = dataclasses.replace(eval_config(cw), tasks=("cloze",), option_likelihood=False, sets=KNOWLEDGE_SETS,
                                   max_people=max_people or None, bootstrap_resamples=1000)
        log(f"FFN width {width}: what the vanilla model knows (cloze, {len(bench.forget)} validation people)")
        knowledge[width] = knowledge_scores(evaluate(model, params, processor, bench, ecfg).results)
        log(f"FFN width {width}: vacuum energy study")
        studies[width] = vacuum_energy_study(model, params, processor, bench, heldout_people=heldout_people,
                                             seed=cw.seed, progress=progress)
    return studies, knowledge


def _pct(score: dict) -> str:
    return (f"{100 * score['value']:.0f} [{100 * score['ci_low']:.0f}, {100 * score['ci_high']:.0f}] "
            f"({score['n_people']} people)")


def format_width_study(studies: dict[int, list[StudyRow]], knowledge: dict[int, dict]) -> str:
    keys = [k for k in (f"{s}/{m}" for s in KNOWLEDGE_SETS for m in KNOWLEDGE_MODES)
            if all(k in knowledge[w] for w in knowledge)]
    lines = ["What each width's vanilla model knows (cloze %, 95% person-bootstrap CI):", "",
             "| FFN width | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {w} | " + " | ".join(_pct(knowledge[w][k]) for k in keys) + " |" for w in sorted(knowledge)]
    lines += ["", "Room for a selective deletion (means over the LM blocks):", "",
              "| vacuum source | pooling | energy | FFN width | retained share of d_ff | forget answers outside | "
              "retain answers (other rows) outside | held-out people outside | selectivity (forget / retain) |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = sorted((r for w in studies for r in summarize_width(w, studies[w])),
                  key=lambda r: (r.source, r.pooling, r.energy, r.width))
    lines += [f"| {r.source} | {r.pooling} | {r.energy:g} | {r.width} | {100 * r.retained_fraction:.1f}% | "
              f"{100 * r.forget_outside:.2f}% | {100 * r.retain_outside:.2f}% | {100 * r.heldout_outside:.2f}% | "
              f"{r.selectivity:.2f} |" for r in rows]
    return "\n".join(lines)


def plot_width_study(studies: dict[int, list[StudyRow]], path: Path) -> None:
    """Two panels against the FFN width: forget answer energy outside the retain span, and the selectivity; one
    line per vacuum source/energy."""
    plt = pyplot()
    rows = [r for w in studies for r in summarize_width(w, studies[w])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(r.source, r.pooling, r.energy) for r in rows}):
        line = sorted((r for r in rows if (r.source, r.pooling, r.energy) == key), key=lambda r: r.width)
        label = f"{key[0]} ({key[1]}), {key[2]:g} energy"
        xs = [r.width for r in line]
        left.plot(xs, [100 * r.forget_outside for r in line], marker="o", label=label)
        right.plot(xs, [r.selectivity for r in line], marker="o", label=label)
    for ax, title in ((left, "forget answer energy outside the retain span (%)"),
                      (right, "selectivity (forget / retain outside)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("FFN width (d_ff)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
