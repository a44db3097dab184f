"""The memory model of the fused kernels, for tensors on the meta device (the memory simulator).

A fused kernel updates parameters and state in place and allocates nothing but state that does
not exist yet (SGD/LARS momentum buffers on their first step). These functions do exactly that and
no math, so a simulated step allocates what a fused GPU step allocates: no temporaries. ``auto``
picks this backend for meta tensors; it cannot be asked for by name.
"""
from __future__ import annotations

import torch

from fused_ft.kernels._layout import new_momentum_buffers

__all__ = ["sgd", "adamw", "lars", "lamb", "lamb_clip", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    return None if device.type == "meta" else f"the meta memory model runs on meta tensors, not {device}"


def sgd(params, grads, momentum_buffers, *, momentum, **_):
    if momentum != 0:
        new_momentum_buffers(params, momentum_buffers)


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, **_):
    pass  # state exists already (the class creates it); the step count is the functional's


lars = sgd  # the same memory behaviour: momentum buffers on the first step, nothing else


def lamb(params, grads, exp_avgs, exp_avg_sqs, **_):
    pass


def lamb_clip(grads, max_grad_norm):
    return None
