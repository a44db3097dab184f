"""The ``fused-ft`` command line: ``demo``, ``grad-norms`` (and the commands of later modules).

Errors a user can fix (a bad argument, missing weights or data) print one line and exit with
status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from fused_ft._extras import MissingExtraError, missing_extra
from fused_ft._validation import check_output_dir
from fused_ft.vision.embedding import EmbeddingNotFound
from fused_ft.vision.models import PretrainedWeightsError

USER_ERRORS = (ValueError, PretrainedWeightsError, EmbeddingNotFound, FileNotFoundError)  # DataError is a ValueError


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """--model, --pretrained, --checkpoint, --num-classes, --image-size and the embedding override."""
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="alias (clip-vit-b16, convnext-b, ...), timm name or open_clip name")
    parser.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="TAG",
                        help="load pretrained weights (the alias's tag, or TAG such as openai)")
    parser.add_argument("--checkpoint", type=Path, help="local weights file (works offline)")
    parser.add_argument("--num-classes", type=_positive_int, default=10, help="size of the new classification head")
    parser.add_argument("--image-size", type=_positive_int, default=None,
                        help="input resolution (default: the model's)")
    parser.add_argument("--embed-names", type=_csv_list, default=None,
                        help="comma-separated module names of the embedding (override the rules)")
    parser.add_argument("--embed-pattern", type=_regex, default=None,
                        help="regex over parameter names (override the rules)")
    parser.add_argument("--stem-only", action="store_true", help="convnets: the stem without the first stage")


def embedding_options(args: argparse.Namespace) -> dict:
    options = {"stem_only": args.stem_only} if args.stem_only else {}
    if args.embed_names is not None:
        options["names"] = args.embed_names
    if args.embed_pattern is not None:
        options["pattern"] = args.embed_pattern
    return options


def _grad_norms(args: argparse.Namespace) -> None:
    from fused_ft.harness import diagnostics
    from fused_ft.harness.data import shift_lab

    check_output_dir("--out", args.out)
    data = args.data
    if data is None:
        if args.pretrained or args.checkpoint is not None or args.model in shift_lab.SHIFT_LAB_MODELS:
            raise ValueError(diagnostics.no_data_error(args.model))
        data = diagnostics.NOISE  # a randomly initialised model: advice would mean nothing anyway
    seeds = list(range(args.seed, args.seed + args.head_seeds))
    result = diagnostics.diagnose(
        args.model, data, pretrained=args.pretrained, checkpoint=str(args.checkpoint) if args.checkpoint else None,
        image_size=args.image_size, num_classes=args.num_classes, head_seeds=seeds, batches=args.batches,
        batch_size=args.batch_size, seed=args.seed, device=args.device, progress=sys.stderr.isatty(),
        **embedding_options(args))
    out = Path(args.out)
    csv_path = diagnostics.write_csv(result.runs, out / "grad_norms.csv")
    json_path = out / "verdict.json"
    json_path.write_text(json.dumps({"model": args.model, "data": data, **result.verdict.to_dict()}, indent=2) + "\n")
    try:  # the plot is the extra; the measurement, its files and the verdict are the command's work
        png_path = diagnostics.plot_grad_norms(result.runs, out / "grad_norms.png", verdict=result.verdict,
                                               title=f"{args.model} on {data}: layer gradient norms")
    except MissingExtraError as exc:
        png_path = None
        print(f"fused-ft grad-norms: skipped grad_norms.png: {exc}", file=sys.stderr)
    print(diagnostics.render_table(diagnostics.summarize(result.runs)))
    print(f"wrote {csv_path}, {json_path}" + (f" and {png_path}" if png_path else ""))
    print(f"verdict: {result.verdict}")


def _csv_list(text: str) -> list[str]:
    """argparse type: comma-separated names, at least one."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated names, at least one, got {text!r}")
    return values


def _regex(text: str) -> str:
    """argparse type: a regular expression that compiles."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression ({exc}): {text!r}") from None
    return text


def _nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """argparse type: distinct comma-separated integers (argparse names the option in its one-line error)."""
    try:
        values = [int(x) for x in _csv_list(text)]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if len(set(values)) < len(values):  # a repeated seed is the same run, counted twice in the intervals
        raise argparse.ArgumentTypeError(f"must be distinct, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _memory(args: argparse.Namespace) -> None:
    from fused_ft.memory import report
    from fused_ft.vision.methods import method

    from fused_ft.vision.models import resolve_model_name

    for name in args.methods:
        method(name)  # unknown methods, models and unwritable plots fail before any profiling
    for name in args.models:
        resolve_model_name(name)
    _check_output_file("--plot", args.plot)
    skipped: list[str] = []
    rows = report.run_table(args.models, args.methods, batch_size=args.batch_size,
                                   step_in_backward=args.step_in_backward, grad_checkpointing=args.grad_checkpointing,
                                   param_dtype=args.param_dtype, bf16_updates=args.bf16_update, skipped=skipped)
    print(report.render_memory_table(rows, args.format))
    for note in skipped:  # on stderr: --format json/csv output stays machine-readable
        print(f"note: {note}", file=sys.stderr)
    if args.plot:
        report.plot_memory_table(rows, args.plot)
        print(f"wrote {args.plot}")


def _check_output_file(option: str, path: str | None) -> None:
    """An output file's folder must exist and the path must not be a folder: checked before the work."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"Invalid {option}: {path!r} is a directory (give a file name, e.g. {path}/plot.png)")
    if not target.parent.is_dir():
        raise ValueError(f"Invalid {option}: the folder {str(target.parent)!r} does not exist")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """What finetune and sweep share: model, data, schedule and output."""
    add_model_arguments(parser, default_model="shift-lab-vit")
    parser.add_argument("--data", default="shift-lab",
                        help="shift-lab[:spurious], imagefolder:DIR, waterbirds:DIR, ...")
    parser.add_argument("--epochs", type=_positive_int, default=3, help="passes over the training set")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per step (all ranks together)")
    parser.add_argument("--after-linear-probe", action="store_true", help="LP-FT's second stage: LRs / 10")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--num-workers", type=_nonnegative_int, default=0, help="DataLoader workers")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    _precision_arguments(parser, several_updates=False)
    parser.add_argument("--dry-run", action="store_true",
                        help="check settings, output folders, data (every image) and model, print the plan, "
                             "train and write nothing")


def _precision_arguments(parser: argparse.ArgumentParser, several_updates: bool) -> None:
    from fused_ft._precision import BF16_UPDATES

    parser.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="weights' dtype; bf16 keeps no fp32 master copy")
    if several_updates:
        parser.add_argument("--bf16-update", type=_choice_list(BF16_UPDATES), default=list(BF16_UPDATES),
                            help="with --param-dtype bf16: comma-separated ways to store bf16 weights, one row each")
    else:
        parser.add_argument("--bf16-update", default="nearest", choices=BF16_UPDATES,
                            help="with --param-dtype bf16: how the optimizer stores the weights")


def _choice_list(choices):
    """argparse type: comma-separated values, each one of ``choices``."""
    def parse(text: str) -> list[str]:
        values = _csv_list(text)
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"must be comma-separated values from {', '.join(choices)}, got {text!r}")
        return values
    return parse


def _base_config(args: argparse.Namespace, **overrides):
    from fused_ft.harness.finetune import FinetuneConfig

    pretrained = args.pretrained
    if args.model.startswith("shift-lab-") and pretrained is False:
        pretrained = "adamw"  # shift-lab models are always pretrained in-process; --pretrained sgd for Appendix E
    return FinetuneConfig(model=args.model, data=args.data, method=overrides.pop("method", "sgd"),
                          lr=overrides.pop("lr", 1e-3), epochs=args.epochs, batch_size=args.batch_size,
                          seed=overrides.pop("seed", 0), out=args.out, pretrained=pretrained,
                          checkpoint=str(args.checkpoint) if args.checkpoint else None, image_size=args.image_size,
                          after_linear_probe=args.after_linear_probe, device=args.device,
                          num_workers=args.num_workers, fsdp=args.fsdp, param_dtype=args.param_dtype,
                          bf16_update=args.bf16_update, **overrides)


def _finetune(args: argparse.Namespace) -> None:
    from fused_ft.harness import sweep
    from fused_ft.harness.finetune import finetune

    if args.lr is None and args.lr_sweep is None:
        raise ValueError("Invalid arguments: give --lr LR or --lr-sweep paper")
    check_output_dir("--out", args.out)
    out = Path(args.out)
    if not args.resume and int(os.environ.get("RANK", "0")) == 0 and out.exists() and any(out.iterdir()):
        raise ValueError(f"Invalid --out: {str(out)!r} is not empty "
                         "(add --resume to continue that run, or pick a new directory)")
    if args.dry_run:
        configs = ([_base_config(args, method=args.method, lr=args.lr, seed=args.seed)] if args.lr is not None else
                   sweep.run_configs(_base_config(args, seed=args.seed), [args.method], args.lr_sweep, [args.seed]))
        _print_dry_run(configs, args.out)
        return
    if args.lr is not None:
        result = finetune(_base_config(args, method=args.method, lr=args.lr, seed=args.seed))
        if int(os.environ.get("RANK", "0")) != 0:
            return  # rank 0 prints
    else:
        results = sweep.run_sweep(_base_config(args, seed=args.seed), [args.method], args.lr_sweep, [args.seed])
        best = sweep.summarize(results)[0]
        result = next(r for r in results if r["lr"] == best["lr"])
        print(f"lr chosen by ID validation: {best['lr']:g}")
    print(json.dumps(result, indent=2))


def _sweep(args: argparse.Namespace) -> None:
    from fused_ft.harness import diagnostics, sweep

    _check_output_file("--plot", args.plot)
    check_output_dir("--out", args.out)
    base = _base_config(args)
    if args.dry_run:
        _print_dry_run(sweep.run_configs(base, args.methods, args.lr_sweep, args.seeds, args.lr_multiplier), args.out)
        return
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args.jobs = 1  # under torchrun every rank runs each fine-tuning together, one after another
    if not rank0:
        base = replace(base, progress=False)
    verdict = None
    if rank0:  # the runs' own heads (one per seed) on their own training images, before any training
        verdict = diagnostics.diagnose(
            base.model, args.data, pretrained=base.pretrained, checkpoint=base.checkpoint, image_size=args.image_size,
            head_seeds=args.seeds, batch_size=args.batch_size, seed=args.seeds[0], device=args.device,
            progress=base.progress and sys.stderr.isatty(), **embedding_options(args)).verdict
    results = sweep.run_sweep(base, args.methods, args.lr_sweep, args.seeds, jobs=args.jobs,
                              lr_multiplier=args.lr_multiplier)
    if not rank0:
        return
    print(f"layer-gradient verdict at initialisation ({args.model}, pretrained={base.pretrained}): {verdict}")
    rows = sweep.summarize(results)
    print(sweep.render_sweep_table(rows, args.format))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps({"verdict": verdict.to_dict(), "rows": rows}, indent=2))
    if args.plot:
        sweep.plot_sweep(rows, args.plot, title=f"{args.model} on {args.data}")
        print(f"wrote {args.plot}")


def _print_dry_run(configs, out: str) -> None:
    from fused_ft.harness.distributed import world_size
    from fused_ft.harness.dry_run import dry_run

    plan = dry_run(configs, world_size(), out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(plan)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (the usage block argparse prints first is what --help is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """--help shows every option's default (argparse's own formatter skips options without help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text.strip()


_HELP = dict(formatter_class=_HelpFormatter)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="fused-ft", description="fused_ft: fine-tune vision models with SGD", **_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="the main job on a built-in default (what `make demo` runs)")
    commands.add_parser("doctor", help="what fused_ft can use here: C++ extension, Triton, CUDA, backends, extras")

    grad = commands.add_parser("grad-norms", **_HELP, help="layer gradient norms at the current weights (paper Fig. 2)")
    add_model_arguments(grad)
    grad.set_defaults(num_classes=None)  # the data's; --data noise: 10
    grad.add_argument("--data", default=None, metavar="SPEC",
                      help="the fine-tuning data, as finetune reads it (shift-lab, imagefolder:DIR, waterbirds:DIR, "
                           "...), or noise (a smoke test of the model, no advice); required for pretrained models")
    grad.add_argument("--head-seeds", type=_positive_int, default=3,
                      help="heads drawn (seeds --seed, --seed+1, ...), as finetune --seed draws them")
    grad.add_argument("--batches", type=_positive_int, default=4, help="minibatches averaged over, per head seed")
    grad.add_argument("--batch-size", type=_positive_int, default=8, help="images per minibatch")
    grad.add_argument("--seed", type=int, default=0, help="seed of the first head and of the minibatches' order")
    grad.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    grad.add_argument("--out", default="grad-norms",
                      help="directory for grad_norms.csv, verdict.json and grad_norms.png")

    from fused_ft.memory.report import DEFAULT_METHODS, DEFAULT_MODELS
    from fused_ft.vision.methods import METHODS

    mem = commands.add_parser("memory", **_HELP, help="memory of a training step per method (paper Table 4), simulated")
    mem.add_argument("--models", type=_csv_list, default=list(DEFAULT_MODELS),
                     help="comma-separated aliases or timm/open_clip names")
    mem.add_argument("--methods", type=_csv_list, default=list(DEFAULT_METHODS), help="comma-separated methods")
    mem.add_argument("--batch-size", type=_positive_int, default=1, help="images per step (the paper's Table 4: 1)")
    mem.add_argument("--step-in-backward", action="store_true", help="update during backward, free gradients")
    mem.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    mem.add_argument("--format", default="table", choices=["table", "md", "csv", "json"], help="output format")
    mem.add_argument("--plot", default=None, help="write a stacked-bar PNG here")
    _precision_arguments(mem, several_updates=True)

    fine = commands.add_parser("finetune", **_HELP, help="fine-tune one model with one method (the paper's protocol)")
    _run_arguments(fine)
    fine.add_argument("--method", required=True, choices=list(METHODS), metavar="METHOD",
                      help=f"one of: {', '.join(METHODS)}")
    lr = fine.add_mutually_exclusive_group(required=True)
    lr.add_argument("--lr", type=float, help="the starting learning rate (cosine schedule to 0)")
    lr.add_argument("--lr-sweep", help="'paper' (the method's 6 LRs) or comma-separated LRs; picks by ID val")
    fine.add_argument("--seed", type=int, default=0, help="seed of the head, data order and augmentation")
    fine.add_argument("--out", default="runs/finetune", help="run directory (metrics, checkpoint, results)")
    fine.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    sw = commands.add_parser("sweep", **_HELP, help="methods x learning rates x seeds; tables like the paper's")
    _run_arguments(sw)
    sw.add_argument("--methods", type=_csv_list,
                    default=["sgd", "sgd-freeze-embed", "sgd-freeze-embed-nomom", "adamw"],
                    help=f"comma-separated methods, from: {', '.join(METHODS)}")
    sw.add_argument("--lr-sweep", default="paper", help="'paper' or comma-separated LRs (same for every method)")
    sw.add_argument("--lr-multiplier", type=float, default=1.0,
                    help="scale the paper grids (e.g. 30 for tiny models whose best LR sits at the grid's top)")
    sw.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated seeds")
    sw.add_argument("--jobs", type=_positive_int, default=min(2, os.cpu_count() or 1), help="runs in parallel")
    sw.add_argument("--out", default="runs/sweep", help="directory of the runs and summary.json")
    sw.add_argument("--format", default="table", choices=["table", "md", "csv", "json"], help="output format")
    sw.add_argument("--plot", default=None, help="write a bar chart PNG here")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from fused_ft.harness import demo

            demo.main()
        elif args.command == "grad-norms":
            _grad_norms(args)
        elif args.command == "memory":
            _memory(args)
        elif args.command == "finetune":
            _finetune(args)
        elif args.command == "sweep":
            _sweep(args)
        elif args.command == "doctor":
            from fused_ft import doctor

            return doctor.main()
    except USER_ERRORS as exc:
        print(f"fused-ft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional dependency: name the extra that installs it
        error = missing_extra(exc, f"fused-ft {args.command}")
        if error is None:
            raise
        print(f"fused-ft {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The ``fused-ft`` console script: :func:`main`, then a quick exit."""
    try:
        code = main()
    finally:
        # The process ends here. Moving the heap (millions of objects of torch, timm, sympy) out of the
        # collector's reach spares the interpreter's final collection: about 1 s of every command,
        # a fifth of the offline --pretrained failure.
        gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
