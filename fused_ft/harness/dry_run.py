"""``--dry-run``: what fine-tuning runs check before their work, without the work.

A run that fails after an hour on a bad image, a typo in a method or a folder it may not resume costs
that hour; a dry run makes the same checks in seconds: the settings, what the output folders hold (a
run to resume must have the same settings and a checkpoint that loads), the data (every image's
header) and the model's structure with each method's optimizer (on the meta device: no weights are
loaded or downloaded). Nothing is trained or written.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from fused_ft._precision import param_dtype_of
from fused_ft.harness.data import DataBundle, load_data, shift_lab
from fused_ft.harness.finetune import FinetuneConfig, check_config, saved_run
from fused_ft.vision.methods import create_optimizer
from fused_ft.vision.models import check_input_size, create_model, resolve_model_name

__all__ = ["dry_run"]


def dry_run(configs: Sequence[FinetuneConfig], world_size: int = 1, out: str | None = None) -> str:
    """Check ``configs`` (runs sharing model and data) as they are checked before training; return the
    plan, a line per fact; ``out`` names the folder the runs are under (default: their common folder).
    Raises what the runs would raise (``ValueError`` and its kin), one line each."""
    for config in configs:
        check_config(config, world_size)
    saved = [saved_run(config) for config in configs]
    base = configs[0]
    data = load_data(base.data, image_size=base.image_size or 224)
    model = _structure(base, data.num_classes)
    check_input_size(model, data.image_size, base.model)
    lines = ["dry run: checked, nothing trained or written",
             f"  data    {_describe_data(data)}",
             f"  model   {base.model}: {_count(model.parameters())} parameters, {_weights(base)}"]
    for method in dict.fromkeys(c.method for c in configs):
        runs = [c for c in configs if c.method == method]
        lrs = ", ".join(f"{lr:g}" for lr in sorted({c.lr for c in runs}))
        lines.append(f"  method  {method}: {_trained(model, method, runs[0])}; lr {lrs}")
    steps = -(-len(data.train) // base.batch_size)
    seeds = ", ".join(map(str, sorted({c.seed for c in configs})))
    lines.append(f"  runs    {len(configs)} (seed {seeds}): {_plural(base.epochs, 'epoch')} of "
                 f"{_plural(steps, 'step')} of {base.batch_size} images"
                 + (f" over {world_size} ranks" if world_size > 1 else ""))
    lines.append(f"  out     {_describe_saved(configs, saved, out)}")
    return "\n".join(lines)


def _structure(config: FinetuneConfig, num_classes: int) -> torch.nn.Module:
    """The model without its weights, in the dtype it will train in."""
    dtype = param_dtype_of(config.param_dtype)
    if config.model in shift_lab.SHIFT_LAB_MODELS:
        with torch.device("meta"):
            return shift_lab.build(config.model, num_classes).to(dtype)
    return create_model(config.model, num_classes, image_size=config.image_size, device="meta").to(dtype)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _count(params) -> str:
    return f"{sum(p.numel() for p in params):,}"


def _weights(config: FinetuneConfig) -> str:
    if config.model in shift_lab.SHIFT_LAB_MODELS:
        return f"pretrained in-process with {config.pretrained or 'adamw'} (once; cached in {shift_lab.cache_dir()})"
    if config.checkpoint is not None:
        return f"weights from {config.checkpoint} (not read in a dry run)"
    if not config.pretrained:
        return "random weights"
    tag = resolve_model_name(config.model)[2] if config.pretrained is True else config.pretrained
    return f"pretrained weights{f' (tag {tag})' if tag else ''} (not loaded in a dry run)"


def _trained(model: torch.nn.Module, method: str, config: FinetuneConfig) -> str:
    """Build the method's optimizer (it freezes what the method freezes), count, and undo the freezing."""
    requires_grad = [p.requires_grad for p in model.parameters()]
    try:
        optimizer = create_optimizer(model, method, lr=config.lr, after_linear_probe=config.after_linear_probe,
                                     bf16_update=config.bf16_update)
        frozen = [p for g in optimizer.param_groups if g.get("frozen") for p in g["params"]]
        trained = [p for g in optimizer.param_groups if not g.get("frozen") for p in g["params"]]
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    return f"{_count(trained)} parameters trained, {_count(frozen)} frozen"


def _describe_data(data: DataBundle) -> str:
    splits = {"train": data.train, "id_val": data.id_val, "id_test": data.id_test, **data.ood_tests}
    sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    origin = "generated" if data.name.startswith("shift-lab") else "every file's header read"
    return f"{data.name}: {data.num_classes} classes; images: {sizes} ({origin})"


def _describe_saved(configs: Sequence[FinetuneConfig], saved, out: str | None) -> str:
    if len(configs) == 1:
        results, ckpt = saved[0]
        where = configs[0].out
        if results is not None:
            return f"{where}: finished (its results are read back, nothing is redone)"
        if ckpt is not None:
            return f"{where}: resumes from epoch {ckpt['state']['epoch']} of {configs[0].epochs}"
        return f"{where}: new"
    finished = sum(r is not None for r, _ in saved)
    resumed = sum(c is not None for _, c in saved)
    return (f"{out or os.path.commonpath([c.out for c in configs])}: {finished} runs finished, {resumed} to resume, "
            f"{len(configs) - finished - resumed} new")
