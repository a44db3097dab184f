"""SGD with momentum, dampening, Nesterov, weight decay and maximize (torch.optim.SGD semantics).

The paper's main optimizer (Kumar et al., "How to Fine-Tune Vision Models with SGD", Appendix A):
momentum 0.9, no weight decay, no dampening, no Nesterov; "SGD (no momentum)" is ``momentum=0``,
which keeps no state at all.
"""
from __future__ import annotations

from typing import Iterable

import torch

from fused_ft._validation import ANY_NUMBER, BOOL, LR, NONNEG, Rule, step_scalar
from fused_ft import _precision
from fused_ft.optim._base import SHARED_ARGS_DOC, FusedOptimizer, GroupPlan, UpdateFn, present
from fused_ft.kernels import reference
from fused_ft.optim._momentum import check_nesterov, momentum_state, skip_needs_the_host, with_momentum_buffers

__all__ = ["SGD", "sgd"]


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent, optionally with momentum: a drop-in for ``torch.optim.SGD``.

    For each parameter :math:`\theta` with gradient :math:`g` (negated when ``maximize``):

    .. math::
        g &\leftarrow g + \lambda\theta \\
        b &\leftarrow g \text{ on the first step, else } \mu b + (1-\tau) g \\
        g &\leftarrow g + \mu b \text{ if nesterov, else } b \\
        \theta &\leftarrow \theta - \gamma g

    Args:
        params: iterable of parameters or of param-group dicts; a group may set ``frozen=True``.
        lr (float or Tensor): learning rate :math:`\gamma` (default: 1e-3).
        momentum (float): momentum factor :math:`\mu` (default: 0; the paper uses 0.9).
        dampening (float): dampening :math:`\tau` for momentum (default: 0).
        weight_decay (float): L2 penalty :math:`\lambda` (default: 0).
        nesterov (bool): Nesterov momentum; needs momentum > 0 and dampening 0 (default: False).
        maximize (bool): maximize the objective instead of minimizing it (default: False).
        foreach (bool, optional): accepted for compatibility; every fused_ft backend is multi-tensor.
        differentiable (bool): must be False (fused_ft updates outside autograd).
        fused (bool, optional): True demands a fused kernel backend (``triton`` or ``cpu``).
        {shared_args}

    Example:
        >>> import torch, fused_ft
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fused_ft.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    _NAME = "sgd"
    _RULES = {
        "lr": LR,
        "momentum": NONNEG,
        "dampening": ANY_NUMBER,
        "weight_decay": Rule(low=0.0, tensor_ok=True),
        "nesterov": BOOL,
        "maximize": BOOL,
    }
    _CROSS_CHECKS = (check_nesterov,)
    _ELEMENT_STATE = ("momentum_buffer",)

    def _state_slots(self, group):
        return momentum_state(group)

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        step_in_backward: bool = False,
        bf16_update: str = "nearest",
        bf16_seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, backend=backend, step_in_backward=step_in_backward,
                         bf16_update=bf16_update, bf16_seed=bf16_seed)

    def _update_group(self, plan: GroupPlan) -> None:
        group = plan.group
        hyper = {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}
        with_momentum_buffers(self.state, plan.params, plan.state,
                              lambda buffers: sgd(plan.params, plan.grads, buffers, update=plan.update,
                                                  rounding=self._rounding(plan), **hyper, **plan.scaler_args()))

    def _scaler_in_kernel(self, plan: GroupPlan) -> bool:
        return super()._scaler_in_kernel(plan) and not skip_needs_the_host(plan.group, plan.state)


SGD.__doc__ = SGD.__doc__.replace("{shared_args}", SHARED_ARGS_DOC)


@torch.no_grad()
def sgd(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float | torch.Tensor,
    nesterov: bool,
    maximize: bool,
    update: UpdateFn | None = None,
    rounding: _precision.Rounding | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Functional SGD over lists of tensors; see :class:`SGD`.

    ``momentum_buffers`` holds one entry per parameter (empty when momentum is 0); ``None``
    entries are replaced by new buffers. ``update`` is a backend implementation (default: reference).
    ``grad_scale`` and ``found_inf``: GradScaler's, for an update whose kernel takes them (the triton
    backend's: see ``SCALER_IN_KERNEL``), which unscales the gradients and skips the update on the device.
    """
    (update or reference.sgd)(
        params, grads, momentum_buffers, lr=step_scalar(lr), momentum=float(momentum), dampening=float(dampening),
        weight_decay=step_scalar(weight_decay), nesterov=nesterov, maximize=maximize, rounding=rounding,
        **present(grad_scale=grad_scale, found_inf=found_inf),
    )


