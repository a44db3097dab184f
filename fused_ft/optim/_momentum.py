"""What SGD and LARS share about momentum: the Nesterov rule and the buffers' bookkeeping (torch.optim.SGD's
state layout)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch


def with_momentum_buffers(
    state: dict, params: list[torch.Tensor], momentum: float, update: Callable[[list], None]
) -> None:
    """Run ``update(buffers)`` with each parameter's ``momentum_buffer`` (None where it has none yet;
    an empty list without momentum), then store the buffers the update created.

    Only new buffers are written back: a ViT-L/14 list has 297 parameters, and a second state
    lookup for each was a tenth of the step's host work.
    """
    if momentum == 0:
        update([])
        return
    buffers = [state[p].get("momentum_buffer") for p in params]
    new = [i for i, b in enumerate(buffers) if b is None]
    update(buffers)
    for i in new:
        state[params[i]]["momentum_buffer"] = buffers[i]


def check_nesterov(group: Mapping[str, Any]) -> None:
    """torch.optim.SGD's rule, which timm's LARS shares."""
    if group.get("nesterov") and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"Invalid nesterov=True with momentum={group['momentum']}, dampening={group['dampening']} "
            "(Nesterov momentum requires a momentum > 0 and zero dampening)"
        )
