"""The ``reference`` backend: pure torch (multi-tensor ``torch._foreach_*``), the numerical oracle.

It runs everywhere and implements every option; the kernel backends (``cpu``, ``triton``) must match it
(one step tight, then over many steps), and it must match torch.optim and timm.optim bit for bit.
Each function has the backend signature shared by every backend module: lists of tensors and the
scalars the optimizer's functional resolved (``fused_ft.optim.<name>``). Low-precision parameters are
updated through fp32 working copies stored once (``fused_ft._precision``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from fused_ft import _dtensor, _precision

__all__ = ["UPDATES", "unavailable_reason", "unsupported_reason", "sgd", "adamw", "lars", "lamb", "lamb_clip",
           "lars_trust_ratio", "lamb_trust_ratio"]


def unavailable_reason(device: torch.device) -> str | None:
    return None  # runs on any device


def unsupported_reason(optimizer: str, options: Mapping[str, Any], dtypes: frozenset) -> str | None:
    return None  # implements every option


def sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                   rounding=None):
    if not params:
        return
    work = _precision.upcast(params, rounding)
    g = _precision.upcast(grads)
    if maximize:
        g = torch._foreach_neg(g)
    if weight_decay != 0:
        g = torch._foreach_add(g, work, alpha=weight_decay)  # a new list: p.grad stays untouched
    if momentum != 0:
        existing = [i for i, b in enumerate(momentum_buffers) if b is not None]
        if existing:
            bufs = [momentum_buffers[i] for i in existing]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [g[i] for i in existing], alpha=1 - dampening)
        for i, b in enumerate(momentum_buffers):
            if b is None:  # torch.optim starts the buffer at the first gradient, undampened
                momentum_buffers[i] = torch.clone(g[i]).detach()
        g = torch._foreach_add(g, momentum_buffers, alpha=momentum) if nesterov else list(momentum_buffers)
    torch._foreach_add_(work, g, alpha=-lr)
    _precision.store(params, work, rounding)


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step_sizes, bias_correction2_sqrts, lr, beta1, beta2,
    eps, weight_decay, amsgrad, maximize, rounding=None,
):
    work = _precision.upcast(params, rounding)
    g = _precision.upcast(grads)
    if maximize:
        g = torch._foreach_neg(g)
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrts)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work, exp_avgs, denom, [-s for s in step_sizes])
    _precision.store(params, work, rounding)


def lars_trust_ratio(w_norm, g_norm, *, trust_coeff, weight_decay, eps, trust_clip, lr):
    """Per-tensor LARS ratios from stacked weight and gradient norms (1 where either norm is 0)."""
    ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)
    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
    return torch.clamp(ratio / lr, max=1.0) if trust_clip else ratio


def lars(
    params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps,
    trust_clip, always_adapt, rounding=None,
):
    if not params:
        return
    work = _precision.upcast(params, rounding)
    g = _precision.upcast(grads)
    if weight_decay != 0 or always_adapt:
        ratios = lars_trust_ratio(
            torch.stack(_dtensor.global_norms(work)), torch.stack(_dtensor.global_norms(g)),
            trust_coeff=trust_coeff, weight_decay=weight_decay, eps=eps, trust_clip=trust_clip, lr=lr,
        )
        g = torch._foreach_add(g, work, alpha=weight_decay)  # a new list: p.grad stays untouched
        torch._foreach_mul_(g, list(ratios.unbind(0)))
    # what remains is exactly SGD's momentum update, with no further weight decay
    sgd(work, g, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening, weight_decay=0.0,
                   nesterov=nesterov, maximize=False)
    _precision.store(params, work, rounding)


def lamb_trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, *, trust_clip: bool) -> torch.Tensor:
    """Per-tensor LAMB ratios from stacked weight and update norms (1 where either norm is 0)."""
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    return torch.clamp(ratio, max=1.0) if trust_clip else ratio


def lamb_clip(grads: list[torch.Tensor], max_grad_norm: float | None) -> torch.Tensor | None:
    """``max(1, ||grads||_2 / max_grad_norm)`` over all gradients (fp32), or None when clipping is off."""
    if max_grad_norm is None or not grads:
        return None
    norms = _dtensor.global_norms(_precision.upcast(grads))
    return (torch.linalg.vector_norm(torch.stack(norms)) / max_grad_norm).clamp_(min=1.0)


def lamb(
    params, grads, exp_avgs, exp_avg_sqs, *, clip, lr, beta1, beta2, beta3, bias_correction1,
    bias_correction2, eps, weight_decay, decoupled_decay_factor, adapt, trust_clip, caution, rounding=None,
):
    if not params:
        return
    work = _precision.upcast(params, rounding)
    g = _precision.upcast(grads)
    if clip is not None:
        g = [x / clip for x in g]  # new tensors: p.grad stays untouched
    if beta3 == 1 - beta1:
        torch._foreach_lerp_(exp_avgs, g, beta3)
    else:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, g, alpha=beta3)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2**0.5)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, bias_correction1)
    torch._foreach_div_(updates, denom)
    if caution:
        for u, grad in zip(updates, g):
            mask = (u * grad > 0).to(grad.dtype)
            u.mul_(mask / mask.mean().clamp_(min=1e-3))
    if decoupled_decay_factor != 0:
        torch._foreach_add_(work, work, alpha=-decoupled_decay_factor)
    elif weight_decay != 0:
        torch._foreach_add_(updates, work, alpha=weight_decay)
    if adapt:
        ratios = lamb_trust_ratio(
            torch.stack(_dtensor.global_norms(work)), torch.stack(_dtensor.global_norms(updates)), trust_clip=trust_clip
        )
        torch._foreach_mul_(updates, list(ratios.unbind(0)))
    torch._foreach_add_(work, updates, alpha=-lr)
    _precision.store(params, work, rounding)


# The backend contract: update name -> function (LAMB's global clip included), as in every backend module.
UPDATES = {"sgd": sgd, "adamw": adamw, "lars": lars, "lamb": lamb, "lamb_clip": lamb_clip}
