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


# Under torch.compile a step's lr (and what is derived from it) reaches a backend as a 0-dim float64 tensor
# (fused_ft._validation.step_scalar). The foreach ops' ``alpha=`` and scalar lists take numbers only, so these
# take such tensors tensor by tensor, in the forms Dynamo records as fused multiply-adds. They are first narrowed
# to fp32 (``_opmath``), as torch's kernels narrow a Python double for fp32, bf16 and fp16 tensors, so that the
# graph computes what the eager step computes (Inductor would otherwise compute in float64 and round once).
def _opmath(value: Any) -> Any:
    return value.to(torch.float32) if isinstance(value, torch.Tensor) else value


def _plus_scaled(xs: list[torch.Tensor], ys: list[torch.Tensor], scale) -> list[torch.Tensor]:
    """New tensors ``x + scale * y``."""
    if isinstance(scale, torch.Tensor):
        return torch._foreach_add(xs, torch._foreach_mul(ys, scale))
    return torch._foreach_add(xs, ys, alpha=scale)


def _add_scaled_(xs: list[torch.Tensor], ys: list[torch.Tensor], scale) -> None:
    """``x += scale * y`` in place. A tensor scale goes tensor by tensor through ``Tensor.add_``, which Dynamo
    records as one fused multiply-add, as the eager kernels round it (a multiply, then an add, differed in the
    last bit from the eager step and from compiled torch.optim)."""
    if isinstance(scale, torch.Tensor):
        for x, y in zip(xs, ys):
            x.add_(y, alpha=scale)
    else:
        torch._foreach_add_(xs, ys, alpha=scale)


def _addcdiv_(xs: list[torch.Tensor], ys: list[torch.Tensor], zs: list[torch.Tensor], scales: list) -> None:
    """``x += scale * y / z`` in place, a scale per tensor. Tensor scales go tensor by tensor through
    ``Tensor.addcdiv_``, which Dynamo records as a fused multiply-add (torch.optim stacks them for
    ``_foreach_addcdiv_``, whose fake run refuses CPU scalars in torch 2.14)."""
    if scales and isinstance(scales[0], torch.Tensor):
        for x, y, z, scale in zip(xs, ys, zs, scales):
            x.addcdiv_(y, z, value=scale)
    else:
        torch._foreach_addcdiv_(xs, ys, zs, scales)


def unsupported_reason(optimizer: str, options: Mapping[str, Any], dtypes: frozenset) -> str | None:
    return None  # implements every option


def sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                   rounding=None):
    if not params:
        return
    lr, weight_decay = _opmath(lr), _opmath(weight_decay)
    work = _precision.upcast(params, rounding)
    g = _precision.upcast(grads)
    if maximize:
        g = torch._foreach_neg(g)
    if isinstance(weight_decay, torch.Tensor) or weight_decay != 0:
        g = _plus_scaled(g, work, weight_decay)  # a new list: p.grad stays untouched
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
    _add_scaled_(work, g, -lr)
    _precision.store(params, work, rounding)


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step_sizes, bias_correction2_sqrts, lr, beta1, beta2,
    eps, weight_decay, amsgrad, maximize, rounding=None,
):
    lr = _opmath(lr)
    step_sizes, bias_correction2_sqrts = [_opmath(s) for s in step_sizes], [_opmath(c) for c in bias_correction2_sqrts]
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
    _addcdiv_(work, exp_avgs, denom, [-s for s in step_sizes])
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
    lr = _opmath(lr)
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
    lr, decoupled_decay_factor = _opmath(lr), _opmath(decoupled_decay_factor)
    bias_correction1, bias_correction2 = _opmath(bias_correction1), _opmath(bias_correction2)
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
    if isinstance(decoupled_decay_factor, torch.Tensor) or decoupled_decay_factor != 0:
        _add_scaled_(work, work, -decoupled_decay_factor)
    elif weight_decay != 0:
        torch._foreach_add_(updates, work, alpha=weight_decay)
    if adapt:
        ratios = lamb_trust_ratio(
            torch.stack(_dtensor.global_norms(work)), torch.stack(_dtensor.global_norms(updates)), trust_clip=trust_clip
        )
        torch._foreach_mul_(updates, list(ratios.unbind(0)))
    _add_scaled_(work, updates, -lr)
    _precision.store(params, work, rounding)


# GradScaler's grad_scale and found_inf are taken by the optimizer (found_inf read on the host, gradients
# unscaled in place, as GradScaler.unscale_ does): see fused_ft.optim._base.FusedOptimizer._take_scaler.
SCALER_IN_KERNEL: frozenset = frozenset()

# The backend contract: update name -> function (LAMB's global clip included), as in every backend module.
UPDATES = {"sgd": sgd, "adamw": adamw, "lars": lars, "lamb": lamb, "lamb_clip": lamb_clip}
