"""The command line the config-driven benches share: --config, --rounds, --reps, --json, then --config.x=y overrides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence


def bench_main(argv, description: str, run: Callable, format_table: Callable, *, rounds: int, reps: int,
               load: Callable | None = None, overrides: Sequence[str] = ()) -> int:
    """Parse the arguments, load the config (`load`, default `load_config`; `overrides` go before the command
    line's), print `format_table(run(c, rounds, reps))` and write the result as JSON when asked."""
    if load is None:
        from vleraser_jax.config import load_config as load

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="configs/tiny_llava.py")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--json", help="write the result here")
    args, rest = p.parse_known_args(argv)  # the rest: --config.x=y overrides
    c = load(args.config, [*overrides, *rest])
    result = run(c, args.rounds, args.reps)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
