"""Sharded parameters (FSDP2's DTensors): every backend updates the local shard.

An update function gets the local tensors of the parameters, gradients and state (views of the
same storage, so in-place updates land in the shards). State a backend creates during the call
(SGD/LARS momentum buffers) is wrapped back into DTensors laid out like their parameter, so that
``torch.distributed.checkpoint`` can reshard it. Norms that LARS and LAMB need of a *whole*
parameter (trust ratios, LAMB's global clipping) are sums of squares all-reduced over the mesh
dimensions the parameter is sharded on: :func:`global_norms` does it while :func:`sharded_call` runs.
"""
from __future__ import annotations

import contextvars
import functools
import sys
from typing import Any, Callable, Sequence

import torch

__all__ = ["is_dtensor", "any_dtensor", "local", "shard_index", "sharded_call", "global_norms"]


def _dtensor_class() -> type | None:
    """DTensor, once something has imported ``torch.distributed.tensor``; until then no tensor can be
    one. Importing it here would cost every ``import fused_ft`` 0.6 s (it pulls in sympy)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)

# the process groups to sum squares over while a sharded update runs (empty: not sharded)
_REDUCE_GROUPS: contextvars.ContextVar[tuple] = contextvars.ContextVar("fused_ft_reduce_groups", default=())


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors: Sequence[Any]) -> bool:
    # over the few distinct types, not every tensor: this runs on every step
    dtensor = _dtensor_class()
    return dtensor is not None and any(issubclass(cls, dtensor) for cls in set(map(type, tensors)))


def local(t: Any) -> Any:
    return t.to_local() if is_dtensor(t) else t


def _shard_groups(params: Sequence[torch.Tensor]) -> tuple:
    """The process groups of the mesh dimensions any parameter is sharded on."""
    from torch.distributed.tensor import Shard

    groups = {}
    for p in params:
        if is_dtensor(p):
            for dim, placement in enumerate(p.placements):
                if isinstance(placement, Shard):
                    group = p.device_mesh.get_group(dim)
                    groups[id(group)] = group
    return tuple(groups.values())


def shard_index(params: Sequence[torch.Tensor]) -> int:
    """Which shard of the parameters this process holds: its coordinate along the mesh dimensions the
    first sharded parameter is split on, 0 when none is. Ranks holding different shards must draw
    different random bits (the kernels number elements from 0 in every shard); replicas of one shard
    the same ones."""
    from torch.distributed.tensor import Shard

    for p in params:
        if is_dtensor(p) and any(isinstance(placement, Shard) for placement in p.placements):
            mesh, coordinate, index = p.device_mesh, p.device_mesh.get_coordinate(), 0
            for dim, placement in enumerate(p.placements):
                if isinstance(placement, Shard):
                    index = index * mesh.size(dim) + coordinate[dim]
            return index
    return 0


def _like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def sharded_call(fn: Callable[..., Any], params: Sequence[torch.Tensor]) -> Callable[..., Any]:
    """``fn`` run on local shards: list arguments are localized element-wise; entries a backend fills
    in (``None`` before the call) come back as DTensors shaped like their parameter."""
    if not any_dtensor(params):
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        local_args = [[local(x) for x in a] if isinstance(a, list) else local(a) for a in args]
        token = _REDUCE_GROUPS.set(_shard_groups(params))
        try:
            result = fn(*local_args, **kwargs)
        finally:
            _REDUCE_GROUPS.reset(token)
        for original, localized in zip(args, local_args):
            if isinstance(original, list) and len(original) == len(params):
                for i, (o, shard) in enumerate(zip(original, localized)):
                    if o is None and shard is not None:
                        original[i] = _like(shard, params[i])
        return result

    return run


def global_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor 2-norms in fp32; inside :func:`sharded_call`, of the whole (all-reduced) tensors."""
    norms = torch._foreach_norm([t.float() for t in tensors]) if tensors else []
    groups = _REDUCE_GROUPS.get()
    if not groups or not norms:
        return list(norms)
    import torch.distributed as dist

    squares = torch.stack(norms).square()
    for group in groups:
        dist.all_reduce(squares, group=group)
    return list(squares.sqrt().unbind(0))
