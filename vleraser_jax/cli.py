"""The `vleraser` command.

Everything reads local paths only: the Hugging Face libraries are put in offline mode before they are
imported, so nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import os
import sys


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # The libraries read these variables once, at import: when main() runs in a process that imported them
    # already (a notebook, a test), switch their flags too.
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def _count(params) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def cmd_inspect(args) -> int:
    from .checkpoints import load_pretrained

    model, params, config = load_pretrained(args.checkpoint)
    print(f"checkpoint   {args.checkpoint}")
    print(f"model_type   {config.model_type}")
    print(f"parameters   {_count(params):,}")
    for name, sub in params.items():
        print(f"  {name:<10} {_count(sub):>14,}")
    text = config.text
    print(
        f"decoder      {text.num_hidden_layers} layers, d_model {text.hidden_size}, d_ff {text.intermediate_size}, "
        f"{text.num_attention_heads} heads / {text.num_key_value_heads} kv heads, vocab {text.vocab_size}, "
        f"rope {text.rope_parameters}"
    )
    return 0


def cmd_convert(args) -> int:
    from .checkpoints import load_pretrained, save_pretrained

    _, params, config = load_pretrained(args.checkpoint)
    out = save_pretrained(
        params,
        config,
        args.out,
        naming=args.naming,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        copy_files_from=args.checkpoint,
    )
    print(f"wrote {out} ({args.naming} tensor names)")
    return 0


def cmd_export_adapter(args) -> int:
    from .experiment.artifacts import export_adapter

    out = export_adapter(args.run_dir, args.out)
    print(f"wrote the PEFT adapter {out} (how to merge it: {out / 'README.md'})")
    return 0


def cmd_plot(args) -> int:
    from .eval.curves import find_train_log, plot_training_curves

    log = find_train_log(args.run_dir)
    print(f"wrote {plot_training_curves(log, args.out)} from {log}")
    return 0


def cmd_generate(args) -> int:
    import jax
    from PIL import Image

    from .generate import generate_batch
    from .checkpoints import load_pretrained
    from .processing import load_processor

    model, params, config = load_pretrained(args.checkpoint, dtype=args.dtype, attention_impl=args.attention)
    processor = load_processor(args.checkpoint)
    images = [Image.open(p).convert("RGB") for p in args.image] if args.image else None
    prompts = [processor.build_prompt(q, with_image=bool(images)) for q in args.question]
    if images and len(images) != len(prompts):
        raise SystemExit(f"give one --image per --question ({len(args.image)} images, {len(prompts)} questions)")
    batch = processor(prompts, images=images, padding_side="left")
    out = generate_batch(
        model,
        params,
        batch,
        processor,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        rng=jax.random.PRNGKey(args.seed) if args.temperature > 0 else None,
    )
    for question, tokens in zip(args.question, out.trimmed()):
        print(f"Q: {question}\nA: {processor.decode(tokens).strip()}\n")
    return 0


def cmd_eval(args) -> int:
    import json

    from .data.mllmu import load_benchmark
    from .eval.evaluate import EvalConfig, evaluate
    from .checkpoints import load_pretrained
    from .eval.report import write_report
    from .eval.report_format import markdown_table
    from .processing import load_processor

    cfg = EvalConfig(
        sets=tuple(args.sets),
        modes=tuple(args.modes),
        few_shot_people=args.few_shot,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        letter_rule=args.letter_rule,
        option_likelihood=not args.no_option_likelihood,
        max_people=args.max_people,
        seed=args.seed,
    )
    print(f"loading model from {args.checkpoint}")
    model, params, config = load_pretrained(args.checkpoint, dtype=args.dtype, attention_impl=args.attention)
    processor = load_processor(args.checkpoint)
    print(f"loading benchmark from {args.data} (forget {args.forget_ratio}%)")
    bench = load_benchmark(args.data, forget_ratio=args.forget_ratio)
    result = evaluate(model, params, processor, bench, cfg)
    method = args.method or f"model:{args.checkpoint}"
    meta = {"data": str(args.data), "forget_ratio": args.forget_ratio, "few_shot_people": args.few_shot,
            "letter_rule": args.letter_rule}
    predictions = f"predictions_{method.replace('/', '_').replace(':', '_')}.jsonl"
    # published together with results.json, so a failure leaves neither half-written
    files = write_report(args.out, method, result.results, meta, items=result.items,
                         extra_files={predictions: "".join(json.dumps(p) + "\n" for p in result.predictions).encode()})
    print(f"evaluated {result.num_prompts} prompts in {result.seconds:.1f} s")
    for mode in cfg.modes:
        print(f"\n{mode}:\n" + markdown_table({method: result.results}, mode))
    print(f"\nreport: {files['markdown']}  results: {files['results']}  predictions: {files['results'].parent / predictions}")
    return 0


def cmd_data_synth(args) -> int:
    import json

    from .data.synthetic import read_info, synthesize, train_synthetic_tokenizer

    root = synthesize(
        args.out,
        seed=args.seed,
        num_people=args.people,
        num_celebrities=args.celebrities,
        image_size=args.image_size,
        num_holdout=args.holdout,
        fact_values=args.fact_values,
        overwrite=args.overwrite,
    )
    print(f"wrote the synthetic benchmark to {root}")
    print(json.dumps(read_info(root), indent=2))
    if args.tokenizer:
        info = train_synthetic_tokenizer(root, args.tokenizer, vocab_size=args.vocab_size, image_size=args.image_size)
        print(f"tokenizer ({info['vocab_size']} tokens, <image> = {info['image_token_id']}) and image processor "
              f"config written to {info['tokenizer_dir']}")
    return 0


def pipeline_config(path, overrides):
    """The config of a command that trains or evaluates, with compiled programs cached in its work dir."""
    from .config import load_config
    from .train.workspace import use_compilation_cache

    c = load_config(path, overrides)
    use_compilation_cache(c)
    return c


def cmd_train(args) -> int:
    from .train.stages import run_stage

    c = pipeline_config(args.config, args.overrides)
    out = run_stage(c, args.stage, force=args.force)
    print(f"{args.stage} model: {out}")
    return 0


def cmd_unlearn(args) -> int:
    from .experiment.runner import run_experiment

    c = pipeline_config(args.config, args.overrides)
    run_experiment(c, args.method, workers=resolve_workers(c, args.workers))
    return 0


def cmd_sweep(args) -> int:
    from .config import _literal
    from .eval.report_selection import write_selection_report
    from .experiment.methods import method_title
    from .experiment.runner import load_selections, selection_dir
    from .experiment.sweep import DEFAULT_BUDGET, DEFAULT_TOLERANCE, restate_selection, run_sweep

    c = pipeline_config(args.config, args.overrides)
    selection = c.get("selection") or {}
    budget = args.budget or selection.get("budget", DEFAULT_BUDGET)
    for method in args.method:
        if args.restate:
            restate_selection(c, method)
            continue
        if args.grid:
            grid = {}
            for item in args.grid:
                key, sep, values = item.partition("=")
                if not sep:
                    raise SystemExit(f"--grid {item!r}: expected name=v1,v2,...")
                grid[key] = [_literal(v) for v in values.split(",")]
        else:
            grids = selection.get("grids") or {}
            if method not in grids:
                raise SystemExit(f"{args.config} has no selection.grids.{method}: pass --grid name=v1,v2 ...")
            grid = {k: list(v) for k, v in dict(grids[method]).items()}
        run_sweep(c, grid, method=method, budget=budget, tolerance=selection.get("tolerance", DEFAULT_TOLERANCE),
                  max_people=selection.get("max_people", 40))
    selections = load_selections(c)
    path = write_selection_report(selection_dir(c), selections, {m: method_title(c, m) for m in selections})
    print(f"selection report: {path}")
    return 0


def cmd_dose_study(args) -> int:
    from .experiment.dose_study import describe_dose_study, run_dose_study, write_dose_study

    c = pipeline_config(args.config, args.overrides)
    print(describe_dose_study(args.method, args.learning_rate, args.steps))
    study = run_dose_study(c, args.method, args.learning_rate, args.steps, max_people=args.max_people)
    print(f"dose study: {write_dose_study(c, study)}")
    return 0


def cmd_vacuum_study(args) -> int:
    from .experiment.pipeline import report_dir_for
    from .experiment.vacuum_study import format_study, vacuum_energy_study
    from .experiment.width_study import vanilla_on_validation
    from .io import write_text_atomic

    c = pipeline_config(args.config, args.overrides)
    if args.widths:
        return _width_study(c, args)
    model, params, processor, bench = vanilla_on_validation(c)
    print(f"vacuum energy study on {len(bench.forget)} validation people against {args.heldout_people} held-out "
          f"retain people (FFN width {model.config.text.intermediate_size})")
    rows = vacuum_energy_study(model, params, processor, bench, heldout_people=args.heldout_people, seed=c.seed)
    table = format_study(rows)
    path = write_text_atomic(report_dir_for(c) / "vacuum_study.md", table + "\n")
    print(table)
    print(f"written to {path}")
    return 0


def _width_study(c, args) -> int:
    from .experiment.pipeline import report_dir_for
    from .experiment.vacuum_study import format_study
    from .experiment.width_study import describe_width_study, format_width_study, plot_width_study, run_width_study
    from .io import write_text_atomic

    widths = sorted(set(args.widths))
    print(describe_width_study(c, widths))
    studies, knowledge = run_width_study(c, widths, heldout_people=args.heldout_people)
    out = report_dir_for(c) / "width_study"
    for width, rows in studies.items():
        write_text_atomic(out / f"vacuum_study_ffn{width}.md", format_study(rows) + "\n")
    table = format_width_study(studies, knowledge)
    path = write_text_atomic(out / "width_study.md", table + "\n")
    plot_width_study(studies, out / "width_study.png")
    print(table)
    print(f"written to {path} (per-block tables and width_study.png beside it)")
    return 0


DEMO_METHODS = ["vl_eraser", "vl_eraser_paper", "vl_eraser_no_vacuum", "vl_eraser_no_distill", "vl_eraser_no_ce",
                "ga", "gd", "kl", "npo", "mmunlearner"]


def demo_diagnostics(args) -> dict | None:
    """The demo's diagnostics switches as run_experiment settings (None: the config's, or the defaults)."""
    from .eval.diagnostics import KINDS

    if args.no_diagnostics:
        return {kind: False for kind in KINDS}
    if args.diagnostics:
        return {kind: kind in args.diagnostics for kind in KINDS}
    return None


def cmd_demo(args) -> int:
    import time
    from pathlib import Path

    from .experiment.overview import describe_run
    from .experiment.runner import run_experiment

    config = Path(args.config or Path(__file__).resolve().parent.parent / "configs" / f"{args.backbone}.py")
    # The demo scores a seeded subsample of each set so every method is evaluated within the time budget;
    # `--config.eval.max_people=0` evaluates everyone.
    overrides = ["--config.eval.max_people=30", f"--config.data.forget_ratio={args.forget_ratio}", *args.overrides]
    c = pipeline_config(config, overrides)
    start = time.perf_counter()
    print(f"demo: {c.name}, forget {c.data.forget_ratio}%, methods {', '.join(args.method)} (work dir {c.work_dir})")
    workers = resolve_workers(c, args.workers)
    print(describe_run(c, args.method, demo_diagnostics(args), workers), flush=True)
    report = run_experiment(c, args.method, diagnostics=demo_diagnostics(args), workers=workers)
    print(f"demo finished in {time.perf_counter() - start:.0f} s\n")
    print((report / "report.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .experiment.plan import add_parser as add_plan_parser

    parser = argparse.ArgumentParser(prog="vleraser", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _checkpoint_commands(sub)
    _pipeline_commands(sub)
    _eval_command(sub)
    add_plan_parser(sub)
    return parser


def _checkpoint_commands(sub) -> None:
    """inspect, convert, export-adapter, plot, generate, data synth: single checkpoints, runs and the benchmark."""
    p = sub.add_parser("inspect", help="load a local HF checkpoint and summarise it")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="re-export a checkpoint (naming scheme, dtype, sharding)")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--naming", choices=["transformers", "legacy"], default="transformers")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-adapter", help="a method run's LoRA as a PEFT adapter for the vanilla torch model")
    p.add_argument("run_dir", help="a method run directory (<report dir>/runs/<method>)")
    p.add_argument("out")
    p.set_defaults(func=cmd_export_adapter)

    p = sub.add_parser("plot", help="draw a run's training curves (loss, lr, grad norm, throughput) to PNG")
    p.add_argument("run_dir", help="a method run directory, a stage's model directory, or a train.jsonl")
    p.add_argument("--out", help="PNG path (default: the log's path with .png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("generate", help="answer questions (optionally about images) with a local checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--question", action="append", required=True, help="repeat for a batch")
    p.add_argument("--image", action="append", help="one per --question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=["reference", "xla", "cudnn"], default="xla")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("data", help="benchmark data")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the synthetic benchmark (MLLMU-Bench layout) from a seed")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--people", type=int, default=200)
    p.add_argument("--celebrities", type=int, default=40)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--holdout", type=int, default=20, help="fictitious people no stage trains on (Holdout_Set)")
    p.add_argument("--fact-values", choices=("shared", "unique"), default="shared",
                   help="shared: facts from small pools (a town is several people's); unique: no two people share one")
    p.add_argument("--tokenizer", help="also train the tiny models' tokenizer into this directory")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_synth)


def _workers_argument(p) -> None:
    p.add_argument("--workers", default="auto",
                   help="methods run on this many processes at once, each with its own output log (default auto: 2 "
                        "on a CPU host with 2+ cores and no mesh, else 1); the report is the same either way")


def resolve_workers(c, value: str) -> int:
    from .experiment.method_pool import default_workers

    if value == "auto":
        return default_workers(c)
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"--workers {value!r}: expected a positive number or auto")
    return int(value)


def _pipeline_commands(sub) -> None:
    """train, demo, unlearn, sweep: a config's stages and experiments."""
    p = sub.add_parser("train", help="train (or reuse) the base, oracle or vanilla model of a config")
    p.add_argument("--config", required=True, help="configs/*.py; override fields with --config.a.b=value")
    p.add_argument("--stage", required=True, choices=["base", "oracle", "vanilla"])
    p.add_argument("--force", action="store_true", help="retrain even if a cached model exists")
    p.set_defaults(func=cmd_train)

    from .eval.diagnostics import KINDS as DIAGNOSTIC_KINDS
    from .experiment.methods import all_methods

    p = sub.add_parser("demo", help="the whole pipeline on the synthetic benchmark: data, base, vanilla, "
                                    "VL-Eraser + ablations + baselines, evaluation, report")
    p.add_argument("--backbone", default="tiny_llava", choices=["tiny_llava", "tiny_qwen2vl"],
                   help="configs/<backbone>.py: the tiny LLaVA-1.5 or Qwen2-VL")
    p.add_argument("--config", help="a config file instead of configs/<backbone>.py")
    p.add_argument("--forget-ratio", type=int, default=15, choices=[5, 10, 15],
                   help="the forget split (15: 15 of the 100 people; forget_5's 5 people can show no significant difference)")
    p.add_argument("--method", nargs="+", default=DEMO_METHODS, choices=all_methods())
    switches = p.add_mutually_exclusive_group()
    switches.add_argument("--no-diagnostics", action="store_true",
                          help="skip the projector/vision reload diagnostic and the quantization and relearning attacks")
    switches.add_argument("--diagnostics", nargs="+", choices=DIAGNOSTIC_KINDS,
                          help="run only these diagnostics (default: the config's diagnostics section, else all)")
    _workers_argument(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("unlearn", help="unlearn the forget set from the config's vanilla model, evaluate, report")
    p.add_argument("--config", required=True, help="configs/*.py; override fields with --config.a.b=value")
    p.add_argument("--method", nargs="+", default=["vl_eraser"], choices=all_methods())
    _workers_argument(p)
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("sweep", help="choose methods' settings on validation pseudo-forget people, the same budget "
                                     "for each (grids from the config's selection section, or --grid)")
    p.add_argument("--config", required=True)
    p.add_argument("--method", nargs="+", default=["vl_eraser"], choices=all_methods())
    p.add_argument("--grid", nargs="+", help="e.g. lambda_=0.3,0.5 rank=4,8 (default: selection.grids.<method>)")
    p.add_argument("--budget", type=int, default=0, help="settings per method (default: selection.budget, 12)")
    p.add_argument("--restate", action="store_true",
                   help="run nothing: rewrite each method's stored selection (this work dir's, else results/) with "
                        "the setting its reported run applies (a baseline at its validation optimizer steps)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("dose-study", help="methods at the same learning rate and optimizer steps on the reported "
                                          "forget people, compared pair by pair on the same people (no selection)")
    p.add_argument("--config", required=True)
    p.add_argument("--method", nargs="+", required=True, choices=all_methods())
    p.add_argument("--learning-rate", type=float, required=True)
    p.add_argument("--steps", type=int, nargs="+", required=True, help="optimizer steps, e.g. 38 76 114 171")
    p.add_argument("--max-people", type=int, default=30, help="people scored per set (the demo's 30)")
    p.set_defaults(func=cmd_dose_study)

    p = sub.add_parser("vacuum-study", help="how much forget answer-key energy lies outside the retain keys' span, "
                                            "against held-out retain people, per vacuum source and threshold")
    p.add_argument("--config", required=True)
    p.add_argument("--heldout-people", type=int, default=10)
    p.add_argument("--widths", type=int, nargs="+", help="repeat the study on vanilla models of these FFN widths "
                                                         "(model.intermediate_size), each trained with the config's "
                                                         "recipe; writes <report>/width_study/")
    p.set_defaults(func=cmd_vacuum_study)


def _eval_command(sub) -> None:
    from .data.mllmu import EVAL_SETS, MODES

    p = sub.add_parser("eval", help="evaluate a checkpoint on MLLMU-Bench (or the synthetic benchmark)")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="local MLLMU-Bench-layout directory")
    p.add_argument("--out", required=True, help="report directory (results.json, report.md, plots)")
    p.add_argument("--method", help="row name in the report (default: the checkpoint path)")
    p.add_argument("--forget-ratio", type=int, default=5, choices=[5, 10, 15])
    p.add_argument("--sets", nargs="+", default=list(EVAL_SETS), choices=EVAL_SETS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--few-shot", type=int, default=0, help="exemplar people per set (MLLMU's eval.py: 2)")
    p.add_argument("--max-people", type=int, help="evaluate a seeded subsample of each set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--letter-rule", choices=["first_alnum", "first_char"], default="first_alnum")
    p.add_argument("--no-option-likelihood", action="store_true",
                   help="skip option likelihood (acc, acc_norm, truth ratio; not the protocol's, reported apart)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=["reference", "xla", "cudnn"], default="xla")
    p.set_defaults(func=cmd_eval)


def main(argv=None) -> int:
    _offline()
    args, unknown = build_parser().parse_known_args(argv)
    overrides = [u for u in unknown if u.startswith("--config.")]
    if len(overrides) != len(unknown) or (overrides and not hasattr(args, "config")):
        build_parser().error(f"unrecognized arguments: {' '.join(u for u in unknown if u not in overrides) or ' '.join(unknown)}")
    args.overrides = overrides
    from .parallel import initialize_distributed

    initialize_distributed()  # multi-host launches (launch/*) only; before anything touches a device
    from .data.mllmu import BenchmarkFormatError
    from .eval.report import ReportError
    from .checkpoints import CheckpointError
    from .models.configs import ConfigError
    from .unlearn.trainer import TrainingDiverged

    # Our error types (and the OS's: missing files, a full disk) carry a message naming the file, tensor,
    # config, column or ID at fault: print it on one line instead of a traceback. Anything else is a bug.
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, BenchmarkFormatError, ReportError, TrainingDiverged, OSError) as e:
        print(f"vleraser: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
