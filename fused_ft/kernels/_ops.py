"""What the kernel backends' torch custom ops share: how an update's arguments cross the op boundary.

Under torch.compile a kernel backend's update runs as one torch custom op (``torch.ops.fused_ft.<name>``),
which Dynamo records in the graph as it is, declaring what it writes: the kernels read data pointers (the
C++ loops, the Triton launches' address tables), which Dynamo's fake tensors do not have, so they cannot be
traced. An op takes the update's arguments by the same names, every real scalar as a float64 tensor (0-dim;
a list of per-tensor scalars 1-D): under torch.compile lr and what derives from it are tensors in the graph
(fused_ft._validation.step_scalar), and a tensor argument lets a scheduler change lr without a recompile.
Arguments the kernels read on the device (``DEVICE_ARGS``: GradScaler's, the capturable step counts) cross
as they are. An eager step calls the update directly (an op's Python dispatch would add its cost to every step).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["DEVICE_ARGS", "host", "traced", "per_tensor", "dispatch"]

# the kernels read these where they are (on the device): never turned into host values or float64 copies (a
# float64 copy of LAMB's fp32 clip sum changed its square root in the last bit)
DEVICE_ARGS = frozenset({"state_steps", "state_step", "grad_scale", "found_inf", "clip_sumsq"})


def host(args: dict[str, Any]) -> dict[str, Any]:
    """An op's arguments as the kernels take them: scalar tensors as Python floats (or lists of floats)."""
    return {k: v if k in DEVICE_ARGS or not isinstance(v, Tensor) else v.item() if v.dim() == 0 else v.tolist()
            for k, v in args.items()}


def traced(value: Any) -> Any:
    """A kernel argument as the ops take it: a real scalar as a 0-dim float64 tensor, anything else as is."""
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    if isinstance(value, Tensor):
        return value.to(torch.float64)
    return value


def per_tensor(values: list | None) -> Any:
    """Per-tensor scalars: the floats, or under torch.compile their tensors stacked into one."""
    return torch.stack(values).to(torch.float64) if values and isinstance(values[0], Tensor) else values


def dispatch(op_name: str, eager: Callable[..., Any], **args: Any) -> Any:
    """``eager(**args)``, or under torch.compile the custom op ``torch.ops.fused_ft.<op_name>``."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fused_ft, op_name)(**{k: v if k in DEVICE_ARGS else traced(v)
                                                       for k, v in args.items()})
    return eager(**args)
