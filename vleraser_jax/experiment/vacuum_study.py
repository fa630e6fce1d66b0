"""Where the room for a selective deletion is: how much of the forget people's answer-key energy lies outside the
span the retain keys use, against the same for retain people's answers the statistics did not contain.

The retain people's QA rows are split in two (alternate rows of each person): one half builds the statistics,
the other is probed, as the evaluation's retain questions are new questions about people the statistics saw.
For each vacuum source (retain image tokens, mean-pooled as in the paper or per token; every retain position)
and each energy threshold, per LM block: the retained rank k, and the share of ‖h‖² outside span(U_k) for
  - forget: the forget people's answer (and name) keys — what a vacuum-space deletion can reach;
  - retain, other rows: answer keys of the statistics' own people on their other questions — what it would
    also hit; their ratio is the selectivity a deletion confined to the vacuum can have at best (1: forget and
    retain answers leave the span equally and fall together; ≫ 1: room);
  - held-out people: retain people wholly left out — a control, exchangeable with the forget people (their
    ratio to forget should be ≈ 1 whatever the model).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..data import mllmu
from ..data.batching import qa_example, tokenize
from ..unlearn import vacuum
from ..unlearn import vl_eraser as vle

STUDY_SOURCES = (("image", "mean"), ("image", "tokens"), ("image+text", "tokens"))
STUDY_ENERGIES = (0.9, 0.99, 0.999)


def position_batches(processor, rows, max_length: int, names: dict[str, str] | None = None, batch_size: int = 32):
    """Batches of `rows` whose vacuum mask marks the answer tokens (and the person's name when `names`)."""
    data = tokenize(processor, [qa_example(processor, r) for r in rows], max_length)
    marked = data.labels != vle.tr.IGNORE_INDEX
    if names:
        marked |= vle.rows_entity_mask(processor, data.input_ids, rows, names).astype(bool)
    return vle.vacuum_masked_batches(data, marked, batch_size)


def outside_share(keys: np.ndarray, basis: np.ndarray) -> float:
    """Σ‖h − U Uᵀ h‖² / Σ‖h‖² over the rows of `keys`."""
    total = float((keys.astype(np.float64) ** 2).sum())
    inside = float(((keys.astype(np.float64) @ basis.astype(np.float64)) ** 2).sum())
    return max(total - inside, 0.0) / max(total, 1e-300)


@dataclasses.dataclass(frozen=True)
class StudyRow:
    source: str
    pooling: str
    energy: float
    block: str
    retained: int
    numerical_rank: int
    forget_outside: float
    retain_outside: float  # the statistics' people, their other rows
    heldout_outside: float  # people left out of the statistics (control)

    @property
    def selectivity(self) -> float:
        return self.forget_outside / max(self.retain_outside, 1e-12)


def split_rows(rows, heldout: set[str]):
    """(statistics rows, the same people's other rows, held-out people's rows): alternate rows per person."""
    seen: dict[str, int] = {}
    stats, other, out = [], [], []
    for r in rows:
        if r.person_id in heldout:
            out.append(r)
            continue
        k = seen.get(r.person_id, 0)
        seen[r.person_id] = k + 1
        (stats if k % 2 == 0 else other).append(r)
    return stats, other, out


def vacuum_energy_study(model, params, processor, bench: mllmu.Benchmark, *, heldout_people: int = 10,
                        max_length: int = 128, energies=STUDY_ENERGIES, sources=STUDY_SOURCES, seed: int = 0,
                        progress: bool = True) -> list[StudyRow]:
    """The study's rows (module docstring) on `bench`: its forget people, the retain people's other rows and
    `heldout_people` retain people the statistics leave out (seeded)."""
    retain_ids = sorted({r.person_id for r in bench.retain_train})
    rng = np.random.default_rng([seed, 17])
    heldout = set(rng.choice(retain_ids, size=heldout_people, replace=False).tolist())
    stats_rows, other_rows, heldout_rows = split_rows(bench.retain_train, heldout)
    names = {p.person_id: p.name for p in (*bench.forget, *bench.retain)}
    probe = {}
    for group, rows in (("forget", bench.forget_train), ("retain", other_rows), ("heldout", heldout_rows)):
        probe[group] = vacuum.collect_keys(model, params, position_batches(processor, rows, max_length, names),
                                           progress=progress, what=f"{group} answer keys")
    rows_out = []
    for source, pooling in sources:
        batches = (vle.retain_image_batches(processor, stats_rows) if source == "image"
                   else vle.retain_text_batches(processor, stats_rows, max_length))
        stats = vacuum.collect_keys(model, params, batches, pooling, progress=progress, what=f"retain keys ({source})")
        for block in sorted(stats.blocks, key=vacuum.natural_key):
            spec = vacuum.spectrum(stats.blocks[block], kind=stats.kind)
            for energy in energies:
                k, _ = vacuum.retained_count(spec, energy, "energy")
                basis = spec.eigvecs[:, :k]
                shares = {g: outside_share(_stacked(probe[g], block), basis) for g in probe}
                rows_out.append(StudyRow(source, pooling, energy, block, k, spec.numerical_rank, shares["forget"],
                                         shares["retain"], shares["heldout"]))
    return rows_out


def _stacked(keys: vacuum.RetainKeys, block: str) -> np.ndarray:
    if keys.kind != "keys":
        raise ValueError("the probe keys did not fit in memory as stacked vectors; raise stack_limit_bytes")
    return keys.blocks[block]


def format_study(rows: list[StudyRow]) -> str:
    lines = ["| vacuum source | pooling | energy | block | retained / numerical rank | forget answers outside | "
             "retain answers (other rows) outside | held-out people outside | selectivity (forget / retain) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.source} | {r.pooling} | {r.energy:g} | {r.block.split('/')[1]} | {r.retained} / "
                     f"{r.numerical_rank} | {100 * r.forget_outside:.2f}% | {100 * r.retain_outside:.2f}% | "
                     f"{100 * r.heldout_outside:.2f}% | {r.selectivity:.2f} |")
    return "\n".join(lines)
