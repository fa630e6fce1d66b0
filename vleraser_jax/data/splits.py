"""Which people play which part beyond the protocol's forget/retain split: the validation pseudo-forget people
(chosen from the retain set, for choosing settings), the people the oracle is retrained without, and the holdout
people nobody ever trains on (for membership inference).

The holdout is our extension: the synthetic benchmark writes a `Holdout_Set` config (Full_Set's columns plus
ft_Data's `metadata`) of fictitious people drawn by the same generator; MLLMU-Bench has none.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from . import mllmu

HOLDOUT_SET = "Holdout_Set"


@dataclasses.dataclass(frozen=True)
class Holdout:
    """People never trained on: their evaluation profiles and their QA pairs (the same kinds as ft_Data's)."""

    people: tuple[mllmu.Profile, ...]
    rows: tuple[mllmu.TrainingRow, ...]


def holdout_features():
    """`datasets.Features` of Holdout_Set: Full_Set's columns and ft_Data's `metadata`."""
    from datasets import Features

    full = mllmu.config_features(mllmu.FULL_SET)
    return Features({**full, "metadata": mllmu.config_features(mllmu.FT_DATA)["metadata"]})


def has_holdout(root: str | os.PathLike) -> bool:
    return Path(root).is_dir() and HOLDOUT_SET in mllmu.list_configs(root)


def load_holdout(root: str | os.PathLike, *, verify_images: bool = True,
                 cache_dir: str | os.PathLike | None = None) -> Holdout | None:
    """The holdout people of a benchmark copy, or None when it has no Holdout_Set (MLLMU-Bench has none)."""
    if not has_holdout(root):
        return None
    kw = dict(verify_images=verify_images, cache_dir=cache_dir)
    people = mllmu.load_profiles(root, HOLDOUT_SET, **kw)
    rows = mllmu.load_training_rows(root, HOLDOUT_SET, **kw)
    return Holdout(people, tuple(r for p in people for r in rows.get(p.person_id, ())))


def validation_ids(retain_ids: list[str], num_people: int, seed: int = 0) -> list[str]:
    """The `num_people` retain people (seeded, in the retain config's order) who play the forget set when
    settings are chosen; sorted."""
    if not 0 < num_people < len(retain_ids):
        raise ValueError(f"validation needs 0 < num_people < {len(retain_ids)} retain people, got {num_people}")
    rng = np.random.default_rng([seed, 7])
    return sorted(retain_ids[i] for i in rng.choice(len(retain_ids), size=num_people, replace=False))


def config_ids(root: str | os.PathLike, config: str) -> list[str]:
    """The person IDs of a config, in file order."""
    columns, rows = mllmu.read_config(root, config)
    if "ID" not in columns:
        raise mllmu.BenchmarkFormatError(f"{config}: missing column 'ID' (columns: {columns})")
    return [row["ID"] for _, row in rows]


def oracle_excluded_ids(root: str | os.PathLike, forget_ratio: int, validation_people: int, seed: int = 0
                        ) -> tuple[list[str], list[str]]:
    """(forget IDs, validation IDs) of a split: the people the oracle is retrained without."""
    forget = config_ids(root, mllmu.forget_config(forget_ratio))
    retain = config_ids(root, mllmu.retain_config(forget_ratio))
    validation = validation_ids(retain, validation_people, seed) if validation_people else []
    return sorted(forget), validation


def validation_benchmark(bench: mllmu.Benchmark, num_people: int, seed: int = 0) -> mllmu.Benchmark:
    """A pseudo-forget split for choosing settings without touching the reported forget people.

    `validation_ids` retain people play the forget set (their Test_Set images as its test set); the other
    retain people stay the retain set; real is unchanged. The reported forget people are in neither.
    """
    chosen = set(validation_ids([p.person_id for p in bench.retain], num_people, seed))
    val = tuple(p for p in bench.retain if p.person_id in chosen)
    by_id = {p.person_id: p for p in val}
    test = mllmu.load_profiles(bench.root, mllmu.TEST_SET, ids=sorted(chosen), fallback=by_id, verify_images=False)
    return dataclasses.replace(
        bench,
        forget=val,
        test=tuple(sorted(test, key=lambda p: p.person_id)),
        retain=tuple(p for p in bench.retain if p.person_id not in chosen),
        forget_train=tuple(r for r in bench.retain_train if r.person_id in chosen),
        retain_train=tuple(r for r in bench.retain_train if r.person_id not in chosen),
    )


def people_rows(rows, ids) -> tuple[mllmu.TrainingRow, ...]:
    """The training rows of these people, in order."""
    keep = set(ids)
    return tuple(r for r in rows if r.person_id in keep)

