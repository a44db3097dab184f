"""Small helpers that work on any torch optimizer."""
from __future__ import annotations

import torch

__all__ = ["optimizer_state_bytes"]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors (per-parameter state and per-group tensors like LAMB's step)."""
    total = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    total += sum(v.nbytes for g in optimizer.param_groups for k, v in g.items() if k != "params" and torch.is_tensor(v))
    return total
