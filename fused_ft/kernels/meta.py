"""The memory model of the fused kernels, for tensors on the meta device (the memory simulator).

A fused kernel updates parameters and state in place and allocates nothing but state that does
not exist yet (SGD/LARS momentum buffers on their first step). These functions do exactly that and
no math, so a simulated step allocates what a fused GPU step allocates: no temporaries. ``auto``
picks this backend for meta tensors; it cannot be asked for by name.
"""
from __future__ import annotations

import torch

from fused_ft.kernels._layout import new_momentum_buffers

__all__ = ["UPDATES", "sgd", "adamw", "lars", "lamb", "lamb_clip", "unavailable_reason", "unsupported_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    return None if device.type == "meta" else f"the meta memory model runs on meta tensors, not {device}"


def unsupported_reason(optimizer, options, dtypes) -> str | None:
    return None  # allocates what any option's state needs


def sgd(params, grads, momentum_buffers, *, momentum, **_):
    if momentum != 0:
        new_momentum_buffers(params, momentum_buffers)


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, **_):
    pass  # state exists already (the class creates it); the step count is the functional's


def lars(params, grads, momentum_buffers, *, momentum, **_):
    sgd(params, grads, momentum_buffers, momentum=momentum)  # SGD's memory: momentum buffers, nothing else


def lamb(params, grads, exp_avgs, exp_avg_sqs, **_):
    pass


def lamb_clip(grads, max_grad_norm):
    return None


# The backend contract (see fused_ft.optim._dispatch): update name -> function.
UPDATES = {"sgd": sgd, "adamw": adamw, "lars": lars, "lamb": lamb, "lamb_clip": lamb_clip}

SCALER_IN_KERNEL: frozenset = frozenset()  # a simulated step has no GradScaler
