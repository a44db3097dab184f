"""The ``cpu`` backend: thin wrappers over the C++ extension ``fused_ft._C`` built from csrc/.

Each function has the signature of the reference implementation it replaces; the C++ side does
one parallel, vectorized pass (two, tensor by tensor, for LARS and LAMB) over the whole list.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Mapping

import torch

from fused_ft.kernels.native import IMPORT_ERROR as _IMPORT_ERROR
from fused_ft.kernels.native import _C, fix
from fused_ft._precision import Rounding
from fused_ft.kernels._layout import compensation_slot, flat_slots, momentum_slots
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
        _C.sgd_(params=s["params"], grads=s["grads"], momentum_buffers=s.get("momentum_buffers", []),
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
        _C.adamw_(params=s["params"], grads=s["grads"], exp_avgs=s["exp_avgs"], exp_avg_sqs=s["exp_avg_sqs"],
                  max_exp_avg_sqs=s.get("max_exp_avg_sqs", []), step_sizes=step_sizes,
                  bias_correction2_sqrts=bias_correction2_sqrts, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, **_rounding_args(rounding, s))


def lars(
    params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps,
    trust_clip, always_adapt, rounding=None,
):
    slots, written, new = momentum_slots(params, grads, momentum_buffers, momentum)
    slots.update(compensation_slot(rounding))
    with _flat(slots, written=(*written, "compensations")) as s:
        _C.lars_(params=s["params"], grads=s["grads"], momentum_buffers=s.get("momentum_buffers", []),
                 new_buffer=new or [], lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                 adapt=weight_decay != 0 or always_adapt, **_rounding_args(rounding, s))


def lamb_clip(grads: list[torch.Tensor], max_grad_norm: float | None) -> float | None:
    """``max(1, ||grads||_2 / max_grad_norm)`` over all gradients, or None when clipping is off."""
    if max_grad_norm is None or not grads:
        return None
    with flat_slots([grads], written=()) as s:
        return max(1.0, math.sqrt(_C.sum_squares(tensors=s[0])) / max_grad_norm)


def lamb(
    params, grads, exp_avgs, exp_avg_sqs, *, clip, lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
    weight_decay, decoupled_decay_factor, adapt, trust_clip, caution, rounding=None,
):
    if caution:
        raise AssertionError("dispatch routes caution=True to the reference backend")
    slots = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             **compensation_slot(rounding)}
    with _flat(slots, written=("params", "exp_avgs", "exp_avg_sqs", "compensations")) as s:
        _C.lamb_(params=s["params"], grads=s["grads"], exp_avgs=s["exp_avgs"], exp_avg_sqs=s["exp_avg_sqs"],
                 clip_divisor=1.0 if clip is None else clip, lr=lr, beta1=beta1, beta2=beta2, beta3=beta3,
                 bias_correction1=bias_correction1, bias_correction2=bias_correction2, eps=eps,
                 weight_decay=weight_decay, decay=1.0 - decoupled_decay_factor, adapt=adapt, trust_clip=trust_clip,
                 **_rounding_args(rounding, s))


# The backend contract (see fused_ft.optim._dispatch): update name -> function.
UPDATES = {"sgd": sgd, "adamw": adamw, "lars": lars, "lamb": lamb, "lamb_clip": lamb_clip}
