"""Fine-tuning with the paper's protocol (Kumar et al., Sec. 4 and Appendix A): one run.

Cosine schedule from the starting LR to 0 over all steps (gradual unfreezing: its own epoch-wise
schedule), early stopping on ID validation accuracy (the best epoch's weights are evaluated), and
ID-validation, ID-test and OOD-test accuracies written as JSONL and ``results.json``.

A checkpoint is written atomically after every epoch (model, optimizer, scheduler, best weights,
RNG states, history); ``resume=True`` continues from it and ends with the same result as an
uninterrupted run: every epoch's data order comes from ``(seed, epoch)``.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from fused_ft._precision import BF16_UPDATE, param_dtype_of
from fused_ft._validation import LR, check_output_dir, check_positive_int
from fused_ft.harness.data import DataBundle, load_data
from fused_ft.harness.distributed import (FSDP_NEEDS_TORCHRUN, Context, check_ranks_agree, follow_trainable_set,
                                          full_state, load_full_state, setup, trainable_signature, unwrap, world_size,
                                          wrap)
from fused_ft.vision.methods import create_optimizer, method as get_method
from fused_ft.vision.models import check_input_size
from fused_ft.vision.unfreeze import GradualUnfreeze

__all__ = ["FinetuneConfig", "finetune", "evaluate", "build_model", "check_config", "saved_run"]


@dataclass
class FinetuneConfig:
    """One fine-tuning run; the CLI's ``fused-ft finetune`` arguments."""

    model: str
    data: str
    method: str
    lr: float
    epochs: int
    batch_size: int
    seed: int = 0
    out: str = "runs/finetune"
    pretrained: Any = False  # False, True or a tag; shift-lab models: "adamw" (default) or "sgd"
    checkpoint: str | None = None
    image_size: int | None = None
    after_linear_probe: bool = False
    device: str | None = None
    num_workers: int = 0
    progress: bool = True
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    param_dtype: str = "fp32"  # "bf16": pure-bf16 weights (no fp32 master copy); inputs follow
    bf16_update: str = "nearest"  # how the optimizer stores bf16 weights (see fused_ft.SGD)


def build_model(config: FinetuneConfig, num_classes: int) -> nn.Module:
    return build_classifier(config.model, num_classes, config.pretrained, config.checkpoint, config.image_size,
                            config.progress)


def build_classifier(name: str, num_classes: int, pretrained: Any = False, checkpoint: str | None = None,
                     image_size: int | None = None, progress: bool = True) -> nn.Module:
    """The model a run fine-tunes, with a new ``num_classes`` head drawn from torch's global RNG (the
    run seeds it first): shift-lab models pretrained in-process (``pretrained`` "adamw", the default,
    or "sgd"), every other name through :func:`fused_ft.vision.models.create_model`."""
    from fused_ft.harness.data import shift_lab
    from fused_ft.vision.models import create_model

    check_weights(name, pretrained, checkpoint)
    if name in shift_lab.SHIFT_LAB_MODELS:
        pretrain = pretrained if isinstance(pretrained, str) else "adamw"
        return shift_lab.create_pretrained(name, num_classes, pretrain, progress=progress)
    return create_model(name, num_classes, pretrained=pretrained, checkpoint=checkpoint, image_size=image_size)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0,
             ctx: Context | None = None) -> float:
    """Top-1 accuracy; under torch.distributed each rank counts a disjoint slice and the counts are summed."""
    ctx = ctx or Context()
    model.eval()
    dtype = next(model.parameters()).dtype
    if ctx.distributed:
        dataset = Subset(dataset, range(ctx.rank, len(dataset), ctx.world))
    correct = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        x, y = batch[0].to(device, dtype), batch[1].to(device)
        with _autocast(device):
            logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    correct, total = ctx.all_sum(correct, total)
    return correct / max(total, 1)


def _autocast(device: torch.device):
    # mixed precision on GPUs (bf16: no GradScaler needed); full fp32 on the CPU
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def check_config(config: FinetuneConfig, ranks: int = 1) -> None:
    """The settings' own checks (names, numbers, paths, the device, a global batch that splits over
    ``ranks`` processes)."""
    get_method(config.method)
    param_dtype_of(config.param_dtype)
    BF16_UPDATE.check("bf16_update", config.bf16_update)
    check_positive_int("epochs", config.epochs)
    check_positive_int("batch_size", config.batch_size)
    LR.check("lr", config.lr)
    check_output_dir("out", config.out)
    check_weights(config.model, config.pretrained, config.checkpoint)
    check_device(config.device)
    if config.fsdp and ranks <= 1:
        raise ValueError(FSDP_NEEDS_TORCHRUN)
    if config.batch_size % ranks:
        raise ValueError(f"Invalid batch_size: {config.batch_size} (the global batch must split evenly over "
                         f"{ranks} ranks)")


def check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"Invalid device: {device!r} (cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {device!r} (no CUDA device is available here)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"Invalid device: {device!r} (this machine has {torch.cuda.device_count()} CUDA devices)")


def check_weights(name: str, pretrained: Any, checkpoint: str | None) -> None:
    """What the weights' arguments may name for model ``name`` (raises ValueError)."""
    from fused_ft.harness.data import shift_lab

    if name in shift_lab.SHIFT_LAB_MODELS and isinstance(pretrained, str):
        shift_lab.check_pretrain_optimizer(pretrained)
    if checkpoint is None:
        return
    if name in shift_lab.SHIFT_LAB_MODELS:  # it was ignored, and recorded as if used
        raise ValueError(f"Invalid checkpoint for {name}: shift-lab models are pretrained in-process "
                         "(pretrained='adamw' or 'sgd'); drop the checkpoint")
    if not Path(checkpoint).is_file():
        raise ValueError(f"Invalid checkpoint: {str(checkpoint)!r} is not a file")


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# What determines a run's result: a resumed run must have the same, or it would record settings it did not use.
RESULT_KEYS = ("model", "data", "method", "lr", "epochs", "batch_size", "seed", "pretrained", "checkpoint",
               "image_size", "after_linear_probe", "param_dtype", "bf16_update")


def _settings(config: FinetuneConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in RESULT_KEYS}


def _check_same_settings(saved: dict[str, Any], config: FinetuneConfig, out: Path) -> None:
    """Refuse to continue (or reuse) a run in ``out`` with different settings, in one line."""
    if not saved:
        return  # written before runs recorded their settings
    now = _settings(config)
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in RESULT_KEYS if saved.get(k) != now[k]]
    if changed:
        raise ValueError(f"Invalid resume: the run in {str(out)!r} was started with other settings "
                         f"({'; '.join(changed)}); use a new --out, or the run's own settings")


DIGEST_FILE = "checkpoint.sha256"  # the checkpoint's checksum when results.json was written


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# What finetune saves in checkpoint.pt, and the type of each part: checked before any of it is used.
CHECKPOINT_LAYOUT = {"model": dict, "optimizer": dict, "scheduler": dict, "torch_rng": torch.Tensor,
                     "python_rng": tuple, "state": dict, "settings": dict}
_STATE_LAYOUT = {"epoch": int, "best_val": float, "best_epoch": int, "history": list}


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The run's checkpoint, read with ``weights_only=True``: tensors and plain values only, so a file
    planted in the run directory cannot run code when it is read (it holds nothing else: finetune saves
    state dicts, RNG states and numbers). Anything else is refused in one line before it is used."""
    try:
        ckpt = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc).lower():
            raise ValueError(f"{path} is damaged: UnpicklingError: {str(exc).splitlines()[0]}; delete it to start "
                             "over, or restore it") from None
        raise ValueError(f"{path} is not a checkpoint fused-ft wrote: it holds objects other than tensors and plain "
                         "values, which could run code when read, so it was not loaded; delete it to start over, or "
                         "restore the run's own checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - truncation shows as EOFError, RuntimeError...
        raise ValueError(f"{path} is damaged: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                         "delete it to start over, or restore it") from None
    _check_layout(ckpt, path)
    return ckpt


def _check_layout(ckpt: Any, path: Path) -> None:
    """Refuse a checkpoint that loads but is not finetune's (or lost a part), naming what is wrong."""
    def refuse(what: str):
        raise ValueError(f"{path} is not a fused-ft finetune checkpoint ({what}); delete it to start over, or "
                         "restore the run's own checkpoint")

    if not isinstance(ckpt, dict):
        refuse(f"it holds a {type(ckpt).__name__}, not a dict")
    for layout, where in ((CHECKPOINT_LAYOUT, ckpt), (_STATE_LAYOUT, ckpt.get("state", {}))):
        for key, kind in layout.items():
            if key not in where:
                refuse(f"no {key!r}")
            if not isinstance(where[key], kind) or (kind is int and isinstance(where[key], bool)):
                refuse(f"{key!r} is a {type(where[key]).__name__}, not a {kind.__name__}")
    if not {"state", "param_groups"} <= ckpt["optimizer"].keys():
        refuse("its 'optimizer' is not an optimizer state dict")


def _finished_result(out: Path, config: FinetuneConfig) -> dict[str, Any] | None:
    """A finished run's results, trusted only when the checkpoint they came from still verifies."""
    results_path, ckpt_path = out / "results.json", out / "checkpoint.pt"
    if not results_path.exists():
        return None
    results = json.loads(results_path.read_text())
    _check_same_settings(results.pop("settings", {}), config, out)
    digest_path = out / DIGEST_FILE
    if digest_path.exists() and (not ckpt_path.exists() or _file_digest(ckpt_path) != digest_path.read_text().strip()):
        raise ValueError(f"{ckpt_path} is damaged or missing: it does not match the checksum in {DIGEST_FILE}; "
                         "delete the run to start over, or restore it")
    return results


def saved_run(config: FinetuneConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(results, checkpoint) of what ``config.out`` holds, either None: a finished run's results, or the
    checkpoint of an unfinished one. Refused before any work: other settings, a damaged checkpoint, a
    finished run whose checkpoint no longer matches its checksum."""
    out = Path(config.out)
    finished = _finished_result(out, config)
    if finished is not None:
        return finished, None
    ckpt_path = out / "checkpoint.pt"
    ckpt = _load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if ckpt is not None:
        _check_same_settings(ckpt.get("settings", {}), config, out)
    return None, ckpt


def finetune(config: FinetuneConfig, data: DataBundle | None = None) -> dict[str, Any]:
    """Run (or resume) one fine-tuning run; return the final metrics (also in ``out/results.json``)."""
    from tqdm import tqdm

    check_config(config, world_size())
    ctx = setup(config.fsdp)
    out = Path(config.out)
    ckpt_path, log_path = out / "checkpoint.pt", out / "metrics.jsonl"
    finished, ckpt = saved_run(config)
    if finished is not None:
        return finished  # finished earlier with the same settings: nothing is redone
    device = torch.device(config.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                            else "cpu"))
    data = data or load_data(config.data, image_size=config.image_size or 224)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    dtype = param_dtype_of(config.param_dtype)
    model = build_model(config, data.num_classes).to(device, dtype)
    check_input_size(model, data.image_size, config.model)
    out.mkdir(parents=True, exist_ok=True)  # only now: a bad model, data or checkpoint leaves no directory
    make_optimizer = lambda m: create_optimizer(m, config.method, lr=config.lr,  # noqa: E731
                                                after_linear_probe=config.after_linear_probe,
                                                bf16_update=config.bf16_update)
    optimizer = make_optimizer(model)  # freezes first: DDP must only see trainable parameters
    model = wrap(model, ctx)
    trainable = trainable_signature(model)
    if ctx.fsdp:
        optimizer = make_optimizer(model)  # fully_shard replaced the parameters with DTensors
    progress = config.progress and ctx.main
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    gradual = get_method(config.method).schedule == "gradual-unfreeze"
    scheduler = (GradualUnfreeze(optimizer, config.epochs) if gradual else
                 torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                   lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps))))
    state = {"epoch": 0, "best_val": -1.0, "best_epoch": -1, "best_model": None, "history": []}
    if ckpt is not None:
        if ctx.main and config.progress:
            print(f"resuming from epoch {ckpt['state']['epoch']} of {config.epochs} ({ckpt_path})")
        load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"], ctx)
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        random.setstate(ckpt["python_rng"])
        state = ckpt["state"]
    # the log is rewritten from the checkpoint's history: a run killed after its last checkpoint
    # leaves no epoch twice in the log and none missing
    if ctx.main:
        log_path.write_text("")
        _append(log_path, {"event": "config", **asdict(config), "device": str(device), "world_size": ctx.world,
                           "num_classes": data.num_classes})
        for record in state["history"]:
            _append(log_path, record)
    for epoch in range(state["epoch"], config.epochs):
        model.train()
        if ctx.distributed:  # the same global order on every rank, each taking its share of every batch
            sampler = DistributedSampler(data.train, ctx.world, ctx.rank, shuffle=True, seed=config.seed)
            sampler.set_epoch(epoch)
            loader = DataLoader(data.train, batch_size=config.batch_size // ctx.world, sampler=sampler,
                                num_workers=config.num_workers)
        else:
            order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=order,
                                num_workers=config.num_workers)
        losses = []
        epoch_lr = optimizer.param_groups[-1]["lr"]  # the LR the epoch starts with (gradual unfreezing: all of it)
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False):
            model, trainable = follow_trainable_set(model, ctx, trainable)  # gradual unfreezing changes it
            x, y = batch[0].to(device, dtype), batch[1].to(device)
            with _autocast(device):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not losses and epoch == state["epoch"]:
                warn_missing_gradients(model, optimizer)
            optimizer.step()
            if not gradual:
                scheduler.step()
            losses.append(loss.item())
        if gradual:
            scheduler.step()
        check_ranks_agree(model, ctx, f"after epoch {epoch + 1}")  # before anything is written from rank 0
        val = evaluate(model, data.id_val, config.batch_size, device, config.num_workers, ctx)
        model_sd, optim_sd = full_state(model, optimizer, ctx)
        if val > state["best_val"]:
            state.update(best_val=val, best_epoch=epoch,
                         best_model={k: v.detach().clone() for k, v in model_sd.items()})
        state["epoch"] = epoch + 1
        loss_sum, count = ctx.all_sum(sum(losses), len(losses))
        record = {"event": "epoch", "epoch": epoch + 1, "train_loss": loss_sum / count, "id_val": val,
                  "lr": epoch_lr}
        state["history"].append(record)
        if ctx.main:
            _save_atomic({"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                          "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "state": state,
                          "settings": _settings(config)}, ckpt_path)
            _append(log_path, record)
        ctx.barrier()
        if progress:
            print(f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f}, ID val {val:.4f}")
    load_full_state(model, None, state["best_model"], None, ctx)  # early stopping on ID validation accuracy
    results = {"model": config.model, "data": data.name, "method": config.method, "lr": config.lr,
               "seed": config.seed, "epochs": config.epochs, "param_dtype": config.param_dtype,
               "bf16_update": config.bf16_update, "best_epoch": state["best_epoch"] + 1,
               "id_val": state["best_val"],
               "world_size": ctx.world,
               "id_test": evaluate(model, data.id_test, config.batch_size, device, config.num_workers, ctx)}
    for name, split in data.ood_tests.items():
        results[name] = evaluate(model, split, config.batch_size, device, config.num_workers, ctx)
    if ctx.main:
        torch.save(state["best_model"], out / "best_model.pt")
        _append(log_path, {"event": "result", **results})
        # what a later call checks before trusting the result: the settings, and the checkpoint's checksum
        (out / DIGEST_FILE).write_text(_file_digest(ckpt_path) + "\n")
        (out / "results.json").write_text(json.dumps({**results, "settings": _settings(config)}, indent=2))
    ctx.barrier()
    return results


def warn_missing_gradients(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Warn (once per run: called after the first backward) when parameters that should train got no
    gradient: they would silently keep their pretrained values."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    should = [p for g in optimizer.param_groups if not g.get("frozen") for p in g["params"] if p.requires_grad]
    missing = [p for p in should if p.grad is None]
    if missing:
        import warnings

        warnings.warn(
            f"{len(missing)} of {len(should)} parameters that should train got no gradient in the first step "
            f"(first: {names.get(id(missing[0]), '?')}); they will not change. Likely cause: reentrant gradient "
            "checkpointing under a frozen stem (its blocks see inputs without requires_grad: use "
            "use_reentrant=False), or layers the forward pass does not use",
            UserWarning, stacklevel=2,
        )


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
