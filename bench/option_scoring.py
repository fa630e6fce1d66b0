"""Option likelihood two ways, side by side in one run: every prompt + option sequence scored on its own
(`score_answers`, what the evaluation did before) and the prompt once per item with each option a cached chunk
after it (`score_options`, what it does now); on a trained stage's evaluation items.

    python -m bench.option_scoring --model runs/models/tiny_llava-vanilla-<key> --data runs/synthetic-0-<hash>

Rounds alternate the two (load changes hit both); the ratio is per round, reported as median (min–max). Round 1
includes compilation and is reported apart. It also counts items whose chosen option differs between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    from vleraser_jax.checkpoints import load_pretrained
    from vleraser_jax.data import mllmu
    from vleraser_jax.data.protocol import Prompter
    from vleraser_jax.eval import evaluate as ev
    from vleraser_jax.eval.likelihood import option_choice, option_examples, score_answers, score_options
    from vleraser_jax.processing import load_processor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a stage or export directory (config.json + safetensors)")
    p.add_argument("--data", required=True, help="the benchmark root")
    p.add_argument("--forget-ratio", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    model, params, _ = load_pretrained(args.model)
    processor = load_processor(args.model)
    bench = mllmu.load_benchmark(args.data, args.forget_ratio)
    cfg = ev.EvalConfig(batch_size=args.batch_size)
    requests = ev.option_requests(bench, Prompter.for_processor(processor), cfg)
    items = [(r.prompt.text, r.prompt.images[0] if r.prompt.images else None, r.item.options) for r in requests]
    examples = [ex for prompt, image, options in items for ex in option_examples(prompt, image, options)]
    print(f"{len(items)} multiple-choice items, {len(examples)} options, batch {args.batch_size}")
    times = {"alone": [], "shared": []}
    for k in range(args.rounds):
        t0 = time.perf_counter()
        alone = score_answers(model, params, processor, examples, batch_size=args.batch_size,
                              max_length=cfg.likelihood_max_length)
        times["alone"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        shared = score_options(model, params, processor, items, batch_size=args.batch_size,
                               max_length=cfg.likelihood_max_length)
        times["shared"].append(time.perf_counter() - t0)
        print(f"round {k + 1}: each option alone {times['alone'][-1]:.1f} s, prompt shared {times['shared'][-1]:.1f} s")
    flips, j = 0, 0
    for (_, _, options), scores, r in zip(items, shared, requests):
        before = option_choice(alone[j:j + len(options)], options, r.item.answer)
        after = option_choice(scores, options, r.item.answer)
        flips += before["option_acc"] != after["option_acc"] or before["option_acc_norm"] != after["option_acc_norm"]
        j += len(options)
    ratios = [a / s for a, s in zip(times["alone"][1:], times["shared"][1:])]
    if ratios:
        print(f"warm rounds: alone {statistics.median(times['alone'][1:]):.1f} s, shared "
              f"{statistics.median(times['shared'][1:]):.1f} s, speed-up {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}); round 1 (compiles): {times['alone'][0]:.1f} vs "
              f"{times['shared'][0]:.1f} s")
    print(f"items whose option_acc or option_acc_norm differs between the two: {flips} of {len(items)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
