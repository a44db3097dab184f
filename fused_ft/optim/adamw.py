"""AdamW (decoupled weight decay), with amsgrad and maximize: torch.optim.AdamW semantics.

The paper's baseline (Appendix A): betas (0.9, 0.999), eps 1e-8, weight decay 0.01. Its state is
two fp32 tensors per parameter (three with amsgrad) plus a step count: the +16% to +48% memory of
the paper's Table 4.
"""
from __future__ import annotations

from typing import Iterable

import torch

from fused_ft.kernels.native import _C
from fused_ft._validation import BETAS, BOOL, LR, NONNEG, scalar_value, step_scalar
from fused_ft import _precision
from fused_ft._precision import new_state
from fused_ft.kernels import reference
from fused_ft.optim._base import SHARED_ARGS_DOC, FusedOptimizer, GroupPlan, UpdateFn, skipped_step
from fused_ft.optim._state import Slot

__all__ = ["AdamW", "adamw"]


# a parameter's step and moments are created together; amsgrad's maximum alone, when amsgrad is turned on
_MOMENTS = (Slot("step", kind="step"), Slot("exp_avg"), Slot("exp_avg_sq"))
_WITH_MAX = (*_MOMENTS, Slot("max_exp_avg_sq", together=False))


class AdamW(FusedOptimizer):
    r"""AdamW: a drop-in for ``torch.optim.AdamW``.

    For each parameter :math:`\theta` with gradient :math:`g` (negated when ``maximize``) at step :math:`t`:

    .. math::
        \theta &\leftarrow \theta (1 - \gamma\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat v &= \max(\hat v_{\max}, v) \text{ if amsgrad, else } v \\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t} \,
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        params: iterable of parameters or of param-group dicts; a group may set ``frozen=True``.
        lr (float or Tensor): learning rate :math:`\gamma` (default: 1e-3).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)`, each in [0, 1) (default: (0.9, 0.999)).
        eps (float): :math:`\epsilon` added to the denominator (default: 1e-8).
        weight_decay (float): decoupled weight decay :math:`\lambda` (default: 1e-2).
        amsgrad (bool): use the running maximum of :math:`v` (default: False).
        maximize (bool): maximize the objective (default: False).
        foreach (bool, optional): accepted for compatibility; every fused_ft backend is multi-tensor.
        capturable (bool): keep each step count on its parameter's device and compute the bias corrections
            there, as torch does, so that a CUDA graph can capture the step (triton backend; ``lr`` may be a
            tensor on the device). Elsewhere the same numbers as False (default: False).
        differentiable (bool): must be False.
        fused (bool, optional): True demands a fused kernel backend (``triton`` or ``cpu``).
        {shared_args}

    Example:
        >>> import torch, fused_ft
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fused_ft.AdamW(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    _NAME = "adamw"
    _ELEMENT_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _RULES = {"lr": LR, "betas": BETAS, "eps": NONNEG, "weight_decay": NONNEG, "amsgrad": BOOL, "maximize": BOOL}

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        step_in_backward: bool = False,
        bf16_update: str = "nearest",
        bf16_seed: int | None = None,
    ) -> None:
        if isinstance(betas, (tuple, list)) and all(isinstance(b, torch.Tensor) for b in betas):
            betas = tuple(scalar_value(b) for b in betas)  # torch accepts 1-element tensors and stores floats
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True,  # the key torch.optim.AdamW stores, so state dicts look the same
        )
        super().__init__(params, defaults, backend=backend, step_in_backward=step_in_backward,
                         bf16_update=bf16_update, bf16_seed=bf16_seed)

    def _state_slots(self, group) -> tuple[Slot, ...]:
        return _WITH_MAX if group["amsgrad"] else _MOMENTS

    def _capture_refusal(self, plan: GroupPlan) -> str | None:
        if not _device_steps(plan.group):  # (fused=True keeps them on the device too, so it captures as well)
            return ("keeps its step counts on the host (capturable=False), and its bias corrections with them; "
                    "pass capturable=True, as to torch.optim.AdamW")
        return super()._capture_refusal(plan, device_lr=True)

    def _scaler_in_kernel(self, plan: GroupPlan) -> bool:
        # the kernels skip on found_inf without the host knowing, so the step counts must live on the device
        return super()._scaler_in_kernel(plan) and _device_steps(plan.group)

    def _update_group(self, plan: GroupPlan) -> None:
        group = plan.group
        columns = plan.state
        steps, exp_avgs, exp_avg_sqs = columns["step"], columns["exp_avg"], columns["exp_avg_sq"]
        max_exp_avg_sqs = columns.get("max_exp_avg_sq", [])
        on_device = _device_steps(group)
        for j in [j for j, m in enumerate(exp_avgs) if m is None]:  # new parameters (the plan checked the three)
            p, state = plan.params[j], self.state[plan.params[j]]
            # torch.optim's rule: on the CPU (no device sync to read it), on the parameter's device where the
            # kernels read it (capturable, fused)
            state["step"] = steps[j] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            state["exp_avg"] = exp_avgs[j] = new_state(p)
            state["exp_avg_sq"] = exp_avg_sqs[j] = new_state(p)
        if on_device:  # loaded (checkpoints keep steps on the CPU, maybe float64), or capturable turned on: once
            for j, (p, t) in enumerate(zip(plan.params, steps)):
                if t.device != p.device or t.dtype != torch.float32:  # the kernels read fp32 counts
                    self.state[p]["step"] = steps[j] = t.to(p.device, torch.float32)
        # amsgrad turned on mid-run (or a new parameter): the running maximum starts at the next v
        for j in [j for j, m in enumerate(max_exp_avg_sqs) if m is None]:
            self.state[plan.params[j]]["max_exp_avg_sq"] = max_exp_avg_sqs[j] = new_state(plan.params[j])
        beta1, beta2 = group["betas"]
        adamw(
            plan.params, plan.grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, update=plan.update,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"], maximize=group["maximize"], capturable=on_device, grad_scale=plan.grad_scale,
            found_inf=plan.found_inf, rounding=self._rounding(plan),
        )


def _device_steps(group) -> bool:
    """Where torch.optim.AdamW keeps a group's step counts on the parameters' device: capturable or fused."""
    return bool(group["capturable"] or group["fused"])


AdamW.__doc__ = AdamW.__doc__.replace("{shared_args}", SHARED_ARGS_DOC)


@torch.no_grad()
def adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    capturable: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    update: UpdateFn | None = None,
    rounding: _precision.Rounding | None = None,
) -> None:
    """Functional AdamW over lists of tensors; see :class:`AdamW`. Increments ``state_steps``.

    The step count and bias corrections are resolved here, once, so that no backend restates them:
    a backend gets each tensor's ``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)``: Python floats, or under
    torch.compile float64 tensors computed in the graph from the step tensors (see ``step_scalar``).

    ``capturable``: ``state_steps`` (fp32, 0-dim) live on the parameters' device and are counted there; an
    update that computes the corrections in its kernel (``update.capturable``, the triton backend's) gets the
    counts, and ``lr`` as it is (a float, or a tensor on the device), so nothing is read on the host; another
    gets them read back (a sync on a GPU): the same numbers either way. ``grad_scale`` and ``found_inf``
    (GradScaler's, 1-element fp32 tensors on the device) go to such a kernel, which unscales and skips there;
    a skipped step's counts are taken back on the device, as torch's fused AdamW does.
    """
    if not params:
        return
    if capturable and getattr(update, "capturable", False):
        torch._foreach_add_(state_steps, 1)
        device_lr = lr if isinstance(lr, torch.Tensor) and lr.device == params[0].device else step_scalar(lr)
        update(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes=None, bias_correction2_sqrts=None,
               state_steps=state_steps, lr=device_lr, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
               weight_decay=float(weight_decay), amsgrad=amsgrad, maximize=maximize, rounding=rounding,
               grad_scale=grad_scale, found_inf=found_inf)
        if found_inf is not None:  # (GradScaler sums the devices' flags: 2 is one skipped step too)
            torch._foreach_sub_(state_steps, [skipped_step(found_inf)] * len(state_steps))
        return
    if grad_scale is not None or found_inf is not None:
        raise ValueError("Invalid grad_scale/found_inf: only an update that takes them in its kernel with "
                         "capturable=True does (the triton backend's)")
    lr = step_scalar(lr)
    beta1, beta2 = float(beta1), float(beta2)

    def corrections(t):
        return lr / (1 - beta1**t), (1 - beta2**t) ** 0.5

    steps = _increment_steps(state_steps)
    if torch.compiler.is_compiling():
        pairs = [corrections(t) for t in steps]
    else:  # once per distinct count (one in a plain run)
        distinct = {t: corrections(t) for t in set(steps)}
        pairs = [distinct[t] for t in steps]
    (update or reference.adamw)(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
        step_sizes=[c[0] for c in pairs], bias_correction2_sqrts=[c[1] for c in pairs],
        lr=lr, beta1=beta1, beta2=beta2, eps=float(eps), weight_decay=float(weight_decay),
        amsgrad=amsgrad, maximize=maximize, rounding=rounding,
    )


def _increment_steps(state_steps: list[torch.Tensor]) -> list[float] | list[torch.Tensor]:
    """Add 1 to every step count and return the counts: one C++ pass where the extension is built
    (torch._foreach_add_ on CPU scalars dispatches once per tensor: 0.7 ms for ViT-L/14's 297). Under
    torch.compile the counts stay in the graph, as float64 tensors (read on the host, each new count would
    break the graph and recompile it)."""
    if torch.compiler.is_compiling():
        torch._foreach_add_(state_steps, 1)
        return [t.reshape(()).to(torch.float64) for t in state_steps]
    steps = _C.increment_steps(state_steps) if _C is not None else []
    if not steps:
        torch._foreach_add_(state_steps, 1)
        # one host read for all counts, not one .item() each
        steps = torch.stack(state_steps).tolist() if len(state_steps) > 1 else [state_steps[0].item()]
    return steps


