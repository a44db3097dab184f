"""The ``cpu`` backend: thin wrappers over the C++ extension ``fused_ft._C`` built from csrc/.

Each function has the signature of the reference implementation it replaces; the C++ side does
one parallel, vectorized pass (two, tensor by tensor, for LARS and LAMB) over the whole list.

Under torch.compile each C++ call runs as a torch custom op (``torch.ops.fused_ft.<kernel>``, defined
below), which Dynamo records in the graph as it is, declaring what it writes; an eager step calls the
extension directly (a custom op's Python dispatch would add its cost to every eager step).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Mapping

import torch
from torch import Tensor

from fused_ft.kernels.native import IMPORT_ERROR as _IMPORT_ERROR
from fused_ft.kernels.native import _C, fix
from fused_ft._precision import Rounding
from fused_ft.kernels._layout import compensation_slot, flat_slots, momentum_slots
from fused_ft.kernels._ops import dispatch, host, per_tensor
from fused_ft.kernels.capabilities import kernel_unsupported_reason

__all__ = ["UPDATES", "sgd", "adamw", "lars", "lamb", "lamb_clip", "unavailable_reason", "unsupported_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"backend='cpu' runs on CPU tensors, but the parameters are on {device}; use backend='auto'"
    if _C is None:
        return (f"backend='cpu' needs the C++ extension fused_ft._C, which is not loaded ({_IMPORT_ERROR}); "
                f"{fix(_IMPORT_ERROR)}")
    return None


def unsupported_reason(optimizer: str, options: Mapping[str, Any], dtypes: frozenset) -> str | None:
    return kernel_unsupported_reason("cpu", optimizer, options, dtypes)


# -- the C++ calls as custom ops, for torch.compile (see fused_ft.kernels._ops) ----------------------------
# ``mutates_args`` names exactly the lists the kernel writes (torch.library.opcheck checks it in the tests).
def _launch(kernel: str, **args: Any) -> Any:
    """Call the extension's ``kernel``: directly, or under torch.compile through its custom op."""
    return dispatch(kernel, getattr(_C, kernel), **args)


# locals() at a function's first line is its arguments: each op forwards them all to the extension
@torch.library.custom_op("fused_ft::sgd_", mutates_args=("params", "momentum_buffers", "compensations"),
                         device_types="cpu")
def _sgd_op(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], new_buffer: list[bool],
            lr: Tensor, momentum: Tensor, dampening: Tensor, weight_decay: Tensor, nesterov: bool, maximize: bool,
            rounding_mode: int, rounding_key: int, compensations: list[Tensor]) -> None:
    _C.sgd_(**host(locals()))


@torch.library.custom_op("fused_ft::adamw_", device_types="cpu",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "compensations"))
def _adamw_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              max_exp_avg_sqs: list[Tensor], step_sizes: Tensor, bias_correction2_sqrts: Tensor, lr: Tensor,
              beta1: Tensor, beta2: Tensor, eps: Tensor, weight_decay: Tensor, amsgrad: bool, maximize: bool,
              rounding_mode: int, rounding_key: int, compensations: list[Tensor]) -> None:
    _C.adamw_(**host(locals()))


@torch.library.custom_op("fused_ft::lars_", mutates_args=("params", "momentum_buffers", "compensations"),
                         device_types="cpu")
def _lars_op(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], new_buffer: list[bool],
             lr: Tensor, momentum: Tensor, dampening: Tensor, weight_decay: Tensor, nesterov: bool,
             trust_coeff: Tensor, eps: Tensor, trust_clip: bool, adapt: bool, rounding_mode: int, rounding_key: int,
             compensations: list[Tensor]) -> None:
    _C.lars_(**host(locals()))


@torch.library.custom_op("fused_ft::lamb_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "compensations"),
                         device_types="cpu")
def _lamb_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
             clip_divisor: Tensor, lr: Tensor, beta1: Tensor, beta2: Tensor, beta3: Tensor, bias_correction1: Tensor,
             bias_correction2: Tensor, eps: Tensor, weight_decay: Tensor, decay: Tensor, adapt: bool, trust_clip: bool,
             rounding_mode: int, rounding_key: int, compensations: list[Tensor]) -> None:
    _C.lamb_(**host(locals()))


@torch.library.custom_op("fused_ft::sum_squares", mutates_args=(), device_types="cpu")
def _sum_squares_op(tensors: list[Tensor]) -> Tensor:
    return torch.tensor(_C.sum_squares(tensors=tensors), dtype=torch.float64)


for _op in (_sgd_op, _adamw_op, _lars_op, _lamb_op):
    _op.register_fake(lambda *args, **kwargs: None)  # they only write their arguments in place


@_sum_squares_op.register_fake
def _(tensors):
    return tensors[0].new_empty((), dtype=torch.float64)


def _rounding_args(rounding: Rounding | None, flat: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    return dict(rounding_mode=0 if rounding is None else rounding.mode_code,
                rounding_key=0 if rounding is None else rounding.key, compensations=flat.get("compensations", []))


@contextmanager
def _flat(slots: dict[str, list[torch.Tensor]], written: tuple[str, ...]):
    """``flat_slots`` by name: the slots with every column that is not flat replaced by contiguous copies."""
    names = list(slots)
    with flat_slots(list(slots.values()), written=[names.index(n) for n in written if n in slots]) as s:
        yield dict(zip(names, s))


def sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
        rounding=None):
    slots, written, new = momentum_slots(params, grads, momentum_buffers, momentum)
    slots.update(compensation_slot(rounding))
    with _flat(slots, written=(*written, "compensations")) as s:
        _launch("sgd_", params=s["params"], grads=s["grads"], momentum_buffers=s.get("momentum_buffers", []),
                new_buffer=new or [],
                lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                maximize=maximize, **_rounding_args(rounding, s))


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step_sizes, bias_correction2_sqrts, lr, beta1, beta2,
    eps, weight_decay, amsgrad, maximize, rounding=None,
):
    slots = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {}), **compensation_slot(rounding)}
    with _flat(slots, written=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "compensations")) as s:
        _launch("adamw_", params=s["params"], grads=s["grads"], exp_avgs=s["exp_avgs"], exp_avg_sqs=s["exp_avg_sqs"],
                max_exp_avg_sqs=s.get("max_exp_avg_sqs", []), step_sizes=per_tensor(step_sizes),
                bias_correction2_sqrts=per_tensor(bias_correction2_sqrts), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, **_rounding_args(rounding, s))


def lars(
    params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps,
    trust_clip, always_adapt, rounding=None,
):
    slots, written, new = momentum_slots(params, grads, momentum_buffers, momentum)
    slots.update(compensation_slot(rounding))
    with _flat(slots, written=(*written, "compensations")) as s:
        _launch("lars_", params=s["params"], grads=s["grads"], momentum_buffers=s.get("momentum_buffers", []),
                 new_buffer=new or [], lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                 adapt=weight_decay != 0 or always_adapt, **_rounding_args(rounding, s))


def lamb_clip(grads: list[torch.Tensor], max_grad_norm: float | None) -> float | Tensor | None:
    """``max(1, ||grads||_2 / max_grad_norm)`` over all gradients, or None when clipping is off (a float64
    tensor under torch.compile)."""
    if max_grad_norm is None or not grads:
        return None
    with flat_slots([grads], written=()) as s:
        squares = _launch("sum_squares", tensors=s[0])
    if isinstance(squares, Tensor):
        return (squares.sqrt() / max_grad_norm).clamp(min=1.0)
    return max(1.0, math.sqrt(squares) / max_grad_norm)


def lamb(
    params, grads, exp_avgs, exp_avg_sqs, *, clip, lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
    weight_decay, decoupled_decay_factor, adapt, trust_clip, caution, rounding=None,
):
    if caution:
        raise AssertionError("dispatch routes caution=True to the reference backend")
    slots = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             **compensation_slot(rounding)}
    with _flat(slots, written=("params", "exp_avgs", "exp_avg_sqs", "compensations")) as s:
        _launch("lamb_", params=s["params"], grads=s["grads"], exp_avgs=s["exp_avgs"], exp_avg_sqs=s["exp_avg_sqs"],
                 clip_divisor=1.0 if clip is None else clip, lr=lr, beta1=beta1, beta2=beta2, beta3=beta3,
                 bias_correction1=bias_correction1, bias_correction2=bias_correction2, eps=eps,
                 weight_decay=weight_decay, decay=1.0 - decoupled_decay_factor, adapt=adapt, trust_clip=trust_clip,
                 **_rounding_args(rounding, s))


# GradScaler's found_inf lives in host memory here, read for free, and the gradients are unscaled by torch's
# foreach before the kernels run (see fused_ft.optim._base.FusedOptimizer._take_scaler).
SCALER_IN_KERNEL: frozenset = frozenset()

# The backend contract (see fused_ft.optim._dispatch): update name -> function.
UPDATES = {"sgd": sgd, "adamw": adamw, "lars": lars, "lamb": lamb, "lamb_clip": lamb_clip}
