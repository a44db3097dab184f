"""What SGD and LARS share about momentum: the Nesterov rule and the buffers' bookkeeping (torch.optim.SGD's
state layout)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from fused_ft.optim._state import Slot


# torch.optim.SGD's state: one buffer, started at a parameter's first gradient (also when momentum is
# turned on mid-run), so it is created on its own
MOMENTUM_SLOTS = (Slot("momentum_buffer", together=False),)


def momentum_state(group: Mapping[str, Any]) -> tuple[Slot, ...]:
    return MOMENTUM_SLOTS if group["momentum"] != 0 else ()


def with_momentum_buffers(
    state: dict, params: list[torch.Tensor], columns: Mapping[str, list], update: Callable[[list], None]
) -> None:
    """Run ``update(buffers)`` with each parameter's ``momentum_buffer`` as the plan gathered them (None
    where it has none yet; an empty list without momentum), then store the buffers the update created.

    Only new buffers are written back: a ViT-L/14 list has 297 parameters, and a second state
    lookup for each was a tenth of the step's host work.
    """
    buffers = columns.get("momentum_buffer", [])
    new = [i for i, b in enumerate(buffers) if b is None]
    update(buffers)
    for i in new:
        state[params[i]]["momentum_buffer"] = buffers[i]


def skip_needs_the_host(group: Mapping[str, Any], columns: Mapping[str, list]) -> bool:
    """Must the host know whether GradScaler skips this step? A new buffer starts at the first gradient,
    undampened. The kernels create it as zeros (b = 0*m + 1*g), so a first step they skip leaves zeros, which
    the next step, no longer new, fills with b = m*0 + (1 - dampening)*g: the same buffer, except with
    dampening. There found_inf is read on the host, once (the buffer's first step)."""
    return group["dampening"] != 0 and any(b is None for b in columns.get("momentum_buffer", ()))


def check_nesterov(group: Mapping[str, Any]) -> None:
    """torch.optim.SGD's rule, which timm's LARS shares."""
    if group.get("nesterov") and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"Invalid nesterov=True with momentum={group['momentum']}, dampening={group['dampening']} "
            "(Nesterov momentum requires a momentum > 0 and zero dampening)"
        )
