"""fp32 working copies for the reference backend: compute in fp32, store the parameter once."""
from __future__ import annotations

import torch

from fused_ft.optim._base import LOW_PRECISION


def upcast(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 copies of low-precision tensors; other tensors are returned as they are (no copy)."""
    return [t.float() if t.dtype in LOW_PRECISION else t for t in tensors]


def store(params: list[torch.Tensor], work: list[torch.Tensor]) -> None:
    """Write fp32 working copies back into their low-precision parameters (round to nearest)."""
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)
