"""LARS / LARC (You et al. 2017): SGD with a layer-wise trust ratio; timm.optim.Lars semantics.

Compared with SGD (freeze-embed) in the paper's Table 5. The trust ratio is computed per tensor
and only where weight decay is non-zero or ``always_adapt`` is set: timm's rule, which leaves
biases and norms (usually put in a no-weight-decay group) unadapted.
"""
from __future__ import annotations

from typing import Iterable

import torch

from fused_ft._validation import ANY_NUMBER, BOOL, LR, NONNEG, step_scalar
from fused_ft import _precision
from fused_ft.optim._base import SHARED_ARGS_DOC, FusedOptimizer, GroupPlan, UpdateFn, present
from fused_ft.kernels import reference
from fused_ft.optim._momentum import check_nesterov, momentum_state, skip_needs_the_host, with_momentum_buffers

__all__ = ["LARS", "lars"]


class LARS(FusedOptimizer):
    r"""LARS / LARC: a drop-in for ``timm.optim.Lars``.

    For each parameter tensor :math:`\theta` with gradient :math:`g`, where adaptation applies
    (``weight_decay != 0`` or ``always_adapt``):

    .. math::
        r &= \eta \frac{\|\theta\|}{\|g\| + \lambda\|\theta\| + \epsilon}
            \text{ (1 if } \|\theta\| = 0 \text{ or } \|g\| = 0\text{)},
            \quad r \leftarrow \min(r/\gamma, 1) \text{ if trust\_clip} \\
        g &\leftarrow r\,(g + \lambda\theta)

    then the SGD momentum update of :class:`fused_ft.SGD` with learning rate :math:`\gamma`.

    Args:
        params: iterable of parameters or of param-group dicts; a group may set ``frozen=True``.
        lr (float or Tensor): learning rate :math:`\gamma` (default: 1.0).
        momentum (float): momentum factor (default: 0).
        dampening (float): dampening for momentum (default: 0).
        weight_decay (float): weight decay :math:`\lambda` (default: 0).
        nesterov (bool): Nesterov momentum (default: False).
        trust_coeff (float): trust coefficient :math:`\eta` (default: 0.001).
        eps (float): :math:`\epsilon` in the trust-ratio denominator (default: 1e-8).
        trust_clip (bool): LARC clipping of the ratio (default: False).
        always_adapt (bool): adapt also where weight decay is 0 (default: False).
        foreach (bool, optional): accepted for compatibility with timm.
        {shared_args}

    Example:
        >>> import torch, fused_ft
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fused_ft.LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    _NAME = "lars"
    _WHOLE_TENSOR_NORMS = True
    _RULES = {
        "lr": LR, "momentum": NONNEG, "dampening": ANY_NUMBER, "weight_decay": NONNEG, "nesterov": BOOL,
        "trust_coeff": NONNEG, "eps": NONNEG, "trust_clip": BOOL, "always_adapt": BOOL,
    }
    _CROSS_CHECKS = (check_nesterov,)
    _ELEMENT_STATE = ("momentum_buffer",)

    def _state_slots(self, group):
        return momentum_state(group)

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1.0,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        always_adapt: bool = False,
        foreach: bool | None = None,
        *,
        backend: str = "auto",
        step_in_backward: bool = False,
        bf16_update: str = "nearest",
        bf16_seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt, foreach=foreach,
        )
        super().__init__(params, defaults, backend=backend, step_in_backward=step_in_backward,
                         bf16_update=bf16_update, bf16_seed=bf16_seed)

    def _update_group(self, plan: GroupPlan) -> None:
        group = plan.group
        hyper = {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "trust_coeff",
                                       "eps", "trust_clip", "always_adapt")}
        with_momentum_buffers(self.state, plan.params, plan.state,
                              lambda buffers: lars(plan.params, plan.grads, buffers, update=plan.update,
                                                   rounding=self._rounding(plan), **hyper, **plan.scaler_args()))

    def _scaler_in_kernel(self, plan: GroupPlan) -> bool:
        return super()._scaler_in_kernel(plan) and not skip_needs_the_host(plan.group, plan.state)


LARS.__doc__ = LARS.__doc__.replace("{shared_args}", SHARED_ARGS_DOC)


@torch.no_grad()
def lars(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coeff: float,
    eps: float,
    trust_clip: bool,
    always_adapt: bool,
    update: UpdateFn | None = None,
    rounding: _precision.Rounding | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Functional LARS over lists of tensors; see :class:`LARS`. ``grad_scale`` and ``found_inf``: GradScaler's,
    for an update whose kernels take them (the triton backend's), which unscale the gradients (for the trust
    ratio's norm too) and skip the update on the device."""
    (update or reference.lars)(
        params, grads, momentum_buffers, lr=step_scalar(lr), momentum=float(momentum), dampening=float(dampening),
        weight_decay=float(weight_decay), nesterov=nesterov, trust_coeff=float(trust_coeff), eps=float(eps),
        trust_clip=trust_clip, always_adapt=always_adapt, rounding=rounding,
        **present(grad_scale=grad_scale, found_inf=found_inf),
    )


