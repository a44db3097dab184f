"""torch.distributed for the harness: ``torchrun --nproc-per-node N fused-ft finetune ...``.

DDP by default, FSDP2 (``fully_shard`` per child module, then the root) with ``fsdp=True``. The
global batch is split over ranks; metrics are summed over ranks (each evaluates a disjoint slice);
only rank 0 writes logs, checkpoints and results. Checkpoints hold full (unsharded) state dicts, so a
run resumes at any world size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Context", "world_size", "setup", "wrap", "full_state", "load_full_state", "DistributedDrift",
           "trainable_signature", "follow_trainable_set", "check_ranks_agree", "fully_shard", "fsdp_runs_here"]


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    fsdp: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def fully_shard(module: nn.Module, **kwargs) -> nn.Module:
    """FSDP2's ``fully_shard``: public as ``torch.distributed.fsdp.fully_shard`` since torch 2.6, and
    ``torch.distributed._composable.fsdp.fully_shard`` in torch 2.5, the oldest release fused_ft supports."""
    try:
        from torch.distributed.fsdp import fully_shard as shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard as shard
    return shard(module, **kwargs)


def fsdp_runs_here() -> bool:
    """Whether FSDP2 can train on this machine: with CUDA under every supported torch, on CPU (gloo) from torch
    2.6 on. torch 2.5's FSDP2 fails the first forward on CPU with 'FSDP requires CUDA for streams'."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return torch.cuda.is_available() or (major, minor) >= (2, 6)


FSDP_NEEDS_CUDA = ("Invalid --fsdp on CPU with torch {}: FSDP2 runs on CPU from torch 2.6 on (torch 2.5's needs "
                   "CUDA); upgrade torch, or drop --fsdp for DDP")

FSDP_NEEDS_TORCHRUN = ("Invalid --fsdp without torchrun: FSDP shards over several processes "
                       "(torchrun --nproc-per-node N fused-ft finetune ... --fsdp)")


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), known before joining their group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(fsdp: bool = False) -> Context:
    """Join the process group torchrun describes (WORLD_SIZE/RANK); a single process otherwise."""
    world = world_size()
    if world <= 1:
        if fsdp:
            raise ValueError(FSDP_NEEDS_TORCHRUN)
        return Context()
    if fsdp and not fsdp_runs_here():
        raise ValueError(FSDP_NEEDS_CUDA.format(torch.__version__))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Context(dist.get_rank(), dist.get_world_size(), fsdp)


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.distributed:
        return model
    if ctx.fsdp:
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        return fully_shard(model)
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def trainable_signature(model: nn.Module) -> tuple[bool, ...]:
    """Which parameters take gradients now (``requires_grad``), in the module's order."""
    return tuple(p.requires_grad for p in unwrap(model).parameters())


def follow_trainable_set(model: nn.Module, ctx: Context, signature: tuple[bool, ...]) -> tuple[nn.Module, tuple]:
    """``model`` wrapped for the parameters that train now: under DDP a new wrapper when the trainable set
    changed since ``signature`` (gradual unfreezing, a user unfreezing layers), else ``model`` itself.

    DDP registers gradient averaging only for the parameters that require a gradient when it is
    built; one unfrozen later trains on its own rank's batch alone, and the ranks drift apart with no
    error. Two ways out were measured (``python -m benchmarks.ddp_unfreeze``, benchmarks/RESULTS.md):
    registering every parameter up front needs ``find_unused_parameters=True`` (an autograd graph
    walk on every step, and all-reducing the frozen parameters' zero gradients): 21% slower steps on
    2 gloo ranks; a new wrapper costs about half a step (one broadcast of the module) each time the
    set changes, a few times per run. So: re-wrap.
    FSDP2 (``fully_shard``) needs nothing: it reduce-scatters whichever gradients exist at each step.
    """
    now = trainable_signature(model)
    if now == signature or not ctx.distributed or ctx.fsdp:
        return model, now
    return wrap(unwrap(model), ctx), now


class DistributedDrift(RuntimeError):
    """The ranks of a data-parallel run hold different parameters: its results would describe no model."""


def check_ranks_agree(model: nn.Module, ctx: Context, when: str) -> None:
    """Compare every parameter across the ranks of a DDP run (two float64 sums each, one all-gather) and
    raise :class:`DistributedDrift` on every rank, naming the first parameter that differs. FSDP2 holds
    each element on one rank only, so there is nothing to compare."""
    if not ctx.distributed or ctx.fsdp:
        return
    named = list(unwrap(model).named_parameters())
    sums = torch.stack([s for _, p in named for s in (p.detach().double().sum(), p.detach().double().square().sum())])
    gathered = [torch.empty_like(sums) for _ in range(ctx.world)]
    dist.all_gather(gathered, sums)
    for rank, other in enumerate(gathered[1:], start=1):
        differs = (other != gathered[0]).nonzero()
        if len(differs):
            name, p = named[int(differs[0]) // 2]
            raise DistributedDrift(
                f"ranks 0 and {rank} hold different values of {name} (shape {tuple(p.shape)}) {when}: the "
                "data-parallel run diverged, so no results are written; please report this with the command line"
            )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _full(t):
    from fused_ft._dtensor import is_dtensor

    return t.full_tensor().cpu() if is_dtensor(t) else t


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state dicts on every rank; an all-gather when sharded."""
    model_sd = {k: _full(v) for k, v in unwrap(model).state_dict().items()}
    if optimizer is None:
        return model_sd, None
    optim_sd = optimizer.state_dict()
    optim_sd["state"] = {i: {k: _full(v) for k, v in s.items()} for i, s in optim_sd["state"].items()}
    return model_sd, optim_sd


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import distribute_tensor

    from fused_ft._dtensor import is_dtensor

    if is_dtensor(target) and not is_dtensor(full):
        return distribute_tensor(full.to(target.device), target.device_mesh, target.placements)
    return full


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                    optim_sd: dict | None, ctx: Context) -> None:
    """Load unsharded state dicts (from :func:`full_state` or a checkpoint), sharding them like the model."""
    current = unwrap(model).state_dict()
    unwrap(model).load_state_dict({k: _like(v, current[k]) if k in current else v for k, v in model_sd.items()})
    if optimizer is None:
        return
    optimizer.load_state_dict(optim_sd)
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and key != "step":
                state[key] = _like(value, p)
