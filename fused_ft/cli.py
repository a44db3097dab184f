"""The ``fused-ft`` command line: ``demo``, ``grad-norms`` (and the commands of later modules).

Errors a user can fix (a bad argument, missing weights or data) print one line and exit with
status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fused_ft.embedding import EmbeddingNotFound
from fused_ft.models import PretrainedWeightsError

USER_ERRORS = (ValueError, PretrainedWeightsError, EmbeddingNotFound, FileNotFoundError)


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """--model, --pretrained, --checkpoint, --num-classes, --image-size and the embedding override."""
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="alias (clip-vit-b16, convnext-b, ...), timm name or open_clip name")
    parser.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="TAG",
                        help="load pretrained weights (the alias's tag, or TAG such as openai)")
    parser.add_argument("--checkpoint", type=Path, help="local weights file (works offline)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--embed-names", type=lambda s: s.split(","), default=None,
                        help="comma-separated module names of the embedding (override the rules)")
    parser.add_argument("--embed-pattern", default=None, help="regex over parameter names (override the rules)")
    parser.add_argument("--stem-only", action="store_true", help="convnets: the stem without the first stage")


def embedding_options(args: argparse.Namespace) -> dict:
    options = {"stem_only": args.stem_only} if args.stem_only else {}
    if args.embed_names is not None:
        options["names"] = args.embed_names
    if args.embed_pattern is not None:
        options["pattern"] = args.embed_pattern
    return options


def build_model(args: argparse.Namespace):
    from fused_ft.models import create_model

    return create_model(args.model, args.num_classes, pretrained=args.pretrained, checkpoint=args.checkpoint,
                        image_size=args.image_size)


def _grad_norms(args: argparse.Namespace) -> None:
    import torch

    from fused_ft import diagnostics

    torch.manual_seed(args.seed)
    model = build_model(args)
    size = args.image_size or _input_size(model)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randn(args.batch_size, 3, size, size, generator=gen),
                torch.randint(0, args.num_classes, (args.batch_size,), generator=gen)) for _ in range(args.batches)]
    rows = diagnostics.layer_grad_norms(model, batches, **embedding_options(args))
    out = Path(args.out)
    csv_path = diagnostics.write_csv(rows, out / "grad_norms.csv")
    png_path = diagnostics.plot(rows, out / "grad_norms.png", title=f"{args.model}: layer gradient norms")
    print(f"{'#':>3} {'layer':<34} {'role':<9} {'params':>10} {'grad norm':>11} {'/param norm':>12} {'/sqrt(n)':>10}")
    for r in rows:
        print(f"{r.index:>3} {r.layer[:34]:<34} {r.role:<9} {r.num_params:>10} {r.grad_norm:>11.4g} "
              f"{r.grad_over_param_norm:>12.4g} {r.grad_over_sqrt_params:>10.4g}")
    print(f"wrote {csv_path} and {png_path}")
    print(f"verdict: {diagnostics.verdict(rows)}")


def _input_size(model) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return int(cfg["input_size"][-1])
    visual = getattr(model, "visual", None)
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _memory(args: argparse.Namespace) -> None:
    from fused_ft import memory_report
    from fused_ft.methods import method

    for name in args.methods:
        method(name)  # an unknown method fails before any profiling
    rows = memory_report.run_table(args.models, args.methods, batch_size=args.batch_size,
                                   step_in_backward=args.step_in_backward, grad_checkpointing=args.grad_checkpointing)
    print(memory_report.render(rows, args.format))
    if args.plot:
        memory_report.plot(rows, args.plot)
        print(f"wrote {args.plot}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-ft", description="fused_ft: fine-tune vision models with SGD")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="the main job on a built-in default (what `make demo` runs)")

    grad = commands.add_parser("grad-norms", help="layer gradient norms at the current weights (paper Fig. 2)")
    add_model_arguments(grad)
    grad.add_argument("--data", default="synthetic", choices=["synthetic"], help="minibatches to measure on")
    grad.add_argument("--batches", type=int, default=4)
    grad.add_argument("--batch-size", type=int, default=8)
    grad.add_argument("--seed", type=int, default=0)
    grad.add_argument("--out", default="grad-norms", help="directory for grad_norms.csv and grad_norms.png")

    from fused_ft.memory_report import DEFAULT_METHODS, DEFAULT_MODELS

    mem = commands.add_parser("memory", help="memory of a training step per method (paper Table 4), simulated")
    mem.add_argument("--models", type=_csv_list, default=list(DEFAULT_MODELS),
                     help="comma-separated aliases or timm/open_clip names")
    mem.add_argument("--methods", type=_csv_list, default=list(DEFAULT_METHODS), help="comma-separated methods")
    mem.add_argument("--batch-size", type=int, default=1)
    mem.add_argument("--step-in-backward", action="store_true", help="update during backward, free gradients")
    mem.add_argument("--grad-checkpointing", action="store_true")
    mem.add_argument("--format", default="table", choices=["table", "md", "csv", "json"])
    mem.add_argument("--plot", default=None, help="write a stacked-bar PNG here")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from fused_ft import demo

            demo.main()
        elif args.command == "grad-norms":
            _grad_norms(args)
        elif args.command == "memory":
            _memory(args)
    except USER_ERRORS as exc:
        print(f"fused-ft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
