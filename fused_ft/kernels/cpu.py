"""The ``cpu`` backend: thin wrappers over the C++ extension ``fused_ft._C`` built from csrc/.

Each function has the signature of the reference implementation it replaces; the C++ side does
one parallel, vectorized pass (two, tensor by tensor, for LARS and LAMB) over the whole list.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from fused_ft.kernels._layout import flat_slots, new_momentum_buffers, kernel_unsupported_reason

from fused_ft._native import IMPORT_ERROR as _IMPORT_ERROR
from fused_ft._native import _C

__all__ = ["sgd", "adamw", "lars", "lamb", "lamb_clip", "unavailable_reason", "unsupported_reason"]


def unavailable_reason() -> str | None:
    if _C is None:
        return (
            f"backend='cpu' needs the C++ extension fused_ft._C, which could not be loaded ({_IMPORT_ERROR}); "
            "install a C++ compiler and reinstall: pip install --no-build-isolation -e ."
        )
    return None


def unsupported_reason(optimizer: str, options: Mapping[str, Any], dtypes: frozenset) -> str | None:
    return kernel_unsupported_reason("cpu", optimizer, options, dtypes)


def sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    has_momentum = momentum != 0
    new = new_momentum_buffers(params, momentum_buffers) if has_momentum else []
    slots = [params, grads] + ([momentum_buffers] if has_momentum else [])
    with flat_slots(slots, written=(0, 2) if has_momentum else (0,)) as s:
        _C.sgd_(s[0], s[1], s[2] if has_momentum else [], new, lr, momentum, dampening, weight_decay, nesterov,
                maximize)


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step_sizes, bias_correction2_sqrts, lr, beta1, beta2,
    eps, weight_decay, amsgrad, maximize,
):
    slots = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    with flat_slots(slots, written=(0, 2, 3, 4) if amsgrad else (0, 2, 3)) as s:
        _C.adamw_(s[0], s[1], s[2], s[3], s[4] if amsgrad else [], step_sizes, bias_correction2_sqrts, lr, beta1, beta2, eps,
                  weight_decay, amsgrad, maximize)


def lars(
    params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps,
    trust_clip, always_adapt,
):
    has_momentum = momentum != 0
    new = new_momentum_buffers(params, momentum_buffers) if has_momentum else []
    slots = [params, grads] + ([momentum_buffers] if has_momentum else [])
    with flat_slots(slots, written=(0, 2) if has_momentum else (0,)) as s:
        _C.lars_(s[0], s[1], s[2] if has_momentum else [], new, lr, momentum, dampening, weight_decay, nesterov,
                 trust_coeff, eps, trust_clip, weight_decay != 0 or always_adapt)


def lamb_clip(grads: list[torch.Tensor], max_grad_norm: float | None) -> float | None:
    """``max(1, ||grads||_2 / max_grad_norm)`` over all gradients, or None when clipping is off."""
    if max_grad_norm is None or not grads:
        return None
    with flat_slots([grads], written=()) as s:
        return max(1.0, math.sqrt(_C.sum_squares(s[0])) / max_grad_norm)


def lamb(
    params, grads, exp_avgs, exp_avg_sqs, *, clip, lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
    weight_decay, decoupled_decay_factor, adapt, trust_clip, caution,
):
    if caution:
        raise AssertionError("dispatch routes caution=True to the reference backend")
    with flat_slots([params, grads, exp_avgs, exp_avg_sqs], written=(0, 2, 3)) as s:
        _C.lamb_(*s, 1.0 if clip is None else clip, lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
                 weight_decay, 1.0 - decoupled_decay_factor, adapt, trust_clip)
