"""LAMB (You et al. 2020), NVLamb variant with global gradient clipping: timm.optim.Lamb semantics.

Compared with SGD (freeze-embed) in the paper's Table 5. Gradients are first divided by
``max(1, ||g||_global / max_grad_norm)`` over every (non-frozen) group; the trust ratio applies
per tensor where weight decay is non-zero or ``always_adapt`` is set.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from fused_ft.optim import _dispatch
from fused_ft._validation import BETAS, BOOL, LR, NONNEG, Rule, scalar_value, step_scalar
from fused_ft import _precision
from fused_ft import _dtensor
from fused_ft._precision import new_state
from fused_ft.kernels import reference
from fused_ft.optim._base import SHARED_ARGS_DOC, FusedOptimizer, GroupPlan, UpdateFn, present, skipped_step
from fused_ft.optim._state import Slot

__all__ = ["LAMB", "lamb"]


def _check_max_grad_norm(group) -> None:
    value = group.get("max_grad_norm")
    if value is not None and value <= 0:
        raise ValueError(f"Invalid max_grad_norm: {value} (must be > 0, or None to disable clipping)")


def _check_corrected_decay(group) -> None:
    if group.get("corrected_weight_decay") and not torch.compiler.is_compiling() and scalar_value(group["lr"]) <= 0:
        raise ValueError(
            f"Invalid corrected_weight_decay=True with lr={group['lr']} (needs the peak lr > 0, used as max lr)"
        )


_MOMENTS = (Slot("exp_avg"), Slot("exp_avg_sq"))  # created together: a parameter has both or neither


class LAMB(FusedOptimizer):
    r"""LAMB: a drop-in for ``timm.optim.Lamb``.

    With :math:`c = \max(1, \|g\|_{\text{global}}/\text{max\_grad\_norm})` and :math:`g \leftarrow g / c`,
    for each tensor at group step :math:`t`:

    .. math::
        m &\leftarrow \beta_1 m + \beta_3 g \quad (\beta_3 = 1-\beta_1 \text{ if grad\_averaging, else } 1) \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        u &= \frac{m / (1-\beta_1^t)}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon} + \lambda\theta
            \quad (\text{or } \theta \leftarrow \theta(1 - \gamma\lambda) \text{ if decoupled\_decay}) \\
        r &= \|\theta\| / \|u\| \text{ (1 if either is 0; } \min(r, 1) \text{ if trust\_clip)} \\
        \theta &\leftarrow \theta - \gamma\, r\, u

    Bias correction uses the group's step count (``group["step"]``, as timm stores it).

    Args:
        params: iterable of parameters or of param-group dicts; a group may set ``frozen=True``.
        lr (float or Tensor): learning rate :math:`\gamma` (default: 1e-3).
        bias_correction (bool): divide by :math:`1-\beta^t` (default: True).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float): :math:`\epsilon` (default: 1e-6).
        weight_decay (float): :math:`\lambda` (default: 0.01).
        grad_averaging (bool): :math:`\beta_3 = 1-\beta_1` rather than 1 (default: True).
        max_grad_norm (float, optional): global gradient clipping norm; None disables (default: 1.0).
        trust_clip (bool): clip the trust ratio at 1 (LAMBC) (default: False).
        always_adapt (bool): apply the trust ratio also where weight decay is 0 (default: False).
        caution (bool): cautious update mask (reference backend only) (default: False).
        decoupled_decay (bool): decoupled weight decay (default: False).
        corrected_weight_decay (bool): scale decoupled decay by ``lr**2 / max_lr`` (default: False).
        foreach (bool, optional): accepted for compatibility with timm.
        capturable (bool): keep the group's step count on its parameters' device, as a fp32 tensor, and compute
            the bias corrections there, so that a CUDA graph can capture the step and GradScaler skips it on the
            device (triton backend; torch.optim's meaning; timm's Lamb has no such argument). Elsewhere the same
            numbers as False (default: False).
        {shared_args}

    Example:
        >>> import torch, fused_ft
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fused_ft.LAMB(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    _NAME = "lamb"
    _WHOLE_TENSOR_NORMS = True
    _ELEMENT_STATE = ("exp_avg", "exp_avg_sq")
    _RULES = {
        "lr": LR, "bias_correction": BOOL, "betas": BETAS, "eps": NONNEG, "weight_decay": NONNEG,
        "grad_averaging": BOOL, "max_grad_norm": Rule(kind="optional_number", low=0.0), "trust_clip": BOOL,
        "always_adapt": BOOL, "caution": BOOL, "decoupled_decay": BOOL, "corrected_weight_decay": BOOL,
    }
    _CROSS_CHECKS = (_check_max_grad_norm, _check_corrected_decay)

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        caution: bool = False,
        decoupled_decay: bool = False,
        corrected_weight_decay: bool = False,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        backend: str = "auto",
        step_in_backward: bool = False,
        bf16_update: str = "nearest",
        bf16_seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
            grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, trust_clip=trust_clip,
            always_adapt=always_adapt, caution=caution, decoupled_decay=decoupled_decay,
            corrected_weight_decay=corrected_weight_decay, foreach=foreach, capturable=capturable,
        )
        # checked before the snapshot is taken, so a bad lr reads "Invalid lr", not a float() error
        self._check_hyperparameters(defaults)
        # timm's key: the constructor lr, the max lr of corrected weight decay (lr**2 / max_lr)
        defaults["max_lr_snapshot"] = scalar_value(lr)
        super().__init__(params, defaults, backend=backend, step_in_backward=step_in_backward,
                         bf16_update=bf16_update, bf16_seed=bf16_seed)

    def _check_step_in_backward(self, defaults) -> None:
        if defaults.get("max_grad_norm") is not None:
            raise ValueError(
                f"Invalid step_in_backward=True with max_grad_norm={defaults['max_grad_norm']} (global gradient "
                "clipping needs every gradient before the first update); pass max_grad_norm=None"
            )

    def _state_slots(self, group) -> tuple[Slot, ...]:
        return _MOMENTS

    def _capture_refusal(self, plan: GroupPlan) -> str | None:
        # the count ticks every step, with or without bias correction: on the host, a replay would freeze it
        if not plan.group["capturable"]:
            return ("counts its step in the group on the host, as timm's Lamb does, and its bias corrections with "
                    "it; pass capturable=True")
        if not _device_step(plan):
            return ("has its step count on the host still (a loaded checkpoint, capturable just turned on); run one "
                    "step before capturing")
        if not plan.params:  # (its group still counts a step, on the device)
            return None
        return super()._capture_refusal(plan)

    def _scaler_in_kernel(self, plan: GroupPlan) -> bool:
        # the kernels skip on found_inf without the host knowing, so the group's step count must live on the device:
        # capturable, with the group on one device (_before_updates puts the count there before the kernels run)
        if not plan.params:
            return True
        device = plan.params[0].device
        return (super()._scaler_in_kernel(plan) and plan.group["capturable"]
                and all(p.device == device for p in plan.group["params"]))

    def _before_updates(self, plans: list[GroupPlan]) -> None:
        # timm reads max_grad_norm from the defaults and clips over all groups together; each backend
        # computes the clip in its own form (the reference: a divisor tensor; triton: partial sums on the device)
        grads = [g for plan in plans for g in plan.grads]
        params = [p for plan in plans for p in plan.params]
        clips = {  # over whole sharded gradients when parameters are DTensors
            name: _dtensor.sharded_call(_dispatch.lamb_clip(name), params)(grads, self.defaults["max_grad_norm"])
            for name in {plan.backend for plan in plans}
        }
        for plan in plans:
            plan.clip = clips[plan.backend]
        # every non-frozen group ticks once per step, with or without gradients, as in timm; in
        # step-in-backward mode at its first updated parameter, or in step() if none was
        for plan in {id(plan.group): plan for plan in plans}.values():
            group = plan.group
            if not self._first_tick(group):
                continue
            # on the CPU as timm keeps it, or on the parameters' device where the kernels read it (capturable; also
            # when this step brought the group no gradient: timm counts the step anyway)
            device = group["params"][0].device if group["capturable"] and group["params"] else torch.device("cpu")
            if "step" not in group:
                group["step"] = torch.tensor(0.0, dtype=torch.float32, device=device)
            elif group["step"].device != device or group["step"].dtype != torch.float32:  # loaded, or turned on
                group["step"] = group["step"].to(device, torch.float32)
            group["step"].add_(1)

    def _update_group(self, plan: GroupPlan) -> None:
        if plan.params:
            self._update_params(plan)
        # a step skipped on the device is not counted, also for a group without gradients, whose step timm counts
        # all the same (found_inf reaches a plan only on the kernel route: one device per group there)
        if plan.found_inf is not None and _device_step(plan):
            plan.group["step"].sub_(skipped_step(plan.found_inf))

    def _update_params(self, plan: GroupPlan) -> None:
        group = plan.group
        device_step = _device_step(plan) and getattr(plan.update, "capturable", False)
        exp_avgs, exp_avg_sqs = plan.state["exp_avg"], plan.state["exp_avg_sq"]
        for j in [j for j, m in enumerate(exp_avgs) if m is None]:  # new parameters (the plan checked the pair)
            state = self.state[plan.params[j]]
            state["exp_avg"] = exp_avgs[j] = new_state(plan.params[j])
            state["exp_avg_sq"] = exp_avg_sqs[j] = new_state(plan.params[j])
        beta1, beta2 = group["betas"]
        if device_step:  # the kernels compute the corrections from the count on the device
            bias_correction1 = bias_correction2 = None
        elif group["bias_correction"]:
            step = step_scalar(group["step"])  # a float64 tensor under torch.compile (see step_scalar)
            bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        else:
            bias_correction1 = bias_correction2 = 1.0
        corrected = group["decoupled_decay"] and group["corrected_weight_decay"]
        lamb(
            plan.params, plan.grads, exp_avgs, exp_avg_sqs, update=plan.update,
            clip=plan.clip, lr=group["lr"], beta1=beta1, beta2=beta2,
            beta3=1 - beta1 if group["grad_averaging"] else 1.0,
            bias_correction1=bias_correction1, bias_correction2=bias_correction2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled_decay=group["decoupled_decay"],
            max_lr=group["max_lr_snapshot"] if corrected else None, trust_clip=group["trust_clip"],
            always_adapt=group["always_adapt"], caution=group["caution"], rounding=self._rounding(plan),
            state_step=group["step"] if device_step and group["bias_correction"] else None, **plan.scaler_args(),
        )


def _device_step(plan: GroupPlan) -> bool:
    """Does the plan's group keep its step count on the plan's device (capturable, one device)?"""
    step, params = plan.group.get("step"), plan.params or plan.group["params"]
    return bool(plan.group["capturable"]) and step is not None and bool(params) and step.device == params[0].device


LAMB.__doc__ = LAMB.__doc__.replace("{shared_args}", SHARED_ARGS_DOC)


@torch.no_grad()
def lamb(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    clip: Any,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    bias_correction1: float | None,
    bias_correction2: float | None,
    eps: float,
    weight_decay: float,
    decoupled_decay: bool,
    max_lr: float | None,
    trust_clip: bool,
    always_adapt: bool,
    caution: bool = False,
    update: UpdateFn | None = None,
    rounding: _precision.Rounding | None = None,
    state_step: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Functional LAMB over one group's tensors; see :class:`LAMB`.

    ``clip`` is the global gradient clipping over all groups as the backend's ``<backend>_lamb_clip``
    computed it (None: no clipping); for the reference backend, the divisor tensor. Capturable: ``state_step``
    (the group's counted fp32 step on the device) with both bias corrections None, for an update that computes
    them in its kernels (``update.capturable``); ``grad_scale`` and ``found_inf``: GradScaler's, for one whose
    kernels take them (the triton backend's, where the step count lives on the device).
    """
    lr = step_scalar(lr)
    if bias_correction1 is not None:
        bias_correction1, bias_correction2 = step_scalar(bias_correction1), step_scalar(bias_correction2)
    # the decoupled decay factor, resolved here once so that no backend restates timm's rule
    decay = 0.0
    if weight_decay != 0 and decoupled_decay:
        decay = (lr if max_lr is None else lr**2 / max_lr) * weight_decay
    (update or reference.lamb)(
        params, grads, exp_avgs, exp_avg_sqs, clip=clip, lr=lr, beta1=float(beta1),
        beta2=float(beta2), beta3=float(beta3), bias_correction1=bias_correction1,
        bias_correction2=bias_correction2, eps=float(eps),
        weight_decay=0.0 if decoupled_decay else float(weight_decay), decoupled_decay_factor=decay,
        adapt=weight_decay != 0 or always_adapt, trust_clip=trust_clip, caution=caution, rounding=rounding,
        **present(state_step=state_step, grad_scale=grad_scale, found_inf=found_inf),
    )


