"""Memory layout rules shared by the kernel backends.

Kernels walk each tensor as ``numel`` consecutive elements from its data pointer. That is valid
when every tensor of a column (param, grad, state of one parameter) is dense and all are laid out
alike; other columns go through contiguous copies that are written back afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from fused_ft.kernels.native import _C
from fused_ft._precision import Rounding, new_state


def dense(t: torch.Tensor) -> bool:
    """Elements fill exactly ``numel`` consecutive slots (any dimension order)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_ok(column: Sequence[torch.Tensor], align: int = 1) -> bool:
    """The column's tensors can be walked as ``numel`` consecutive elements from their data pointers
    (each starting at a multiple of ``align`` bytes)."""
    first = column[0]
    if any(t.numel() != first.numel() for t in column):
        # torch's grad setter keeps shapes equal; only a `.data` swap gets here
        raise ValueError(
            f"Invalid tensors: a parameter of {first.numel()} elements has a gradient or state tensor of "
            f"{[t.numel() for t in column]} elements"
        )
    if align > 1 and any(t.data_ptr() % align for t in column):
        return False
    for t in column:
        if not t.is_contiguous():
            break
    else:
        return True
    return all(t.stride() == first.stride() for t in column) and dense(first)


@contextmanager
def flat_slots(
    slots: Sequence[Sequence[torch.Tensor]], written: Sequence[int], align: int = 1
) -> Iterator[list[list[torch.Tensor]]]:
    """``slots`` with each column that is not flat (see ``flat_ok``) replaced by copies laid out as the
    column's first tensor (the parameter) is, or contiguous where it is not dense (``torch.empty_like``'s
    rule, which the reference backend's fp32 copies follow too), copied back into the ``written`` slots on
    exit. The kernels number elements in memory order, and stochastic rounding hashes that number: copies
    in the parameter's layout keep the bits the parameter's own, whatever the gradient's layout (contiguous
    copies of a transposed parameter drew other bits than the reference). Copies are fresh allocations,
    so they are aligned as the allocator aligns (64 bytes on CPU, 512 on CUDA)."""
    out = [list(slot) for slot in slots]
    copied = []
    for j, column in enumerate(zip(*out)):
        if not flat_ok(column, align):
            like = column[0]
            for s, t in enumerate(column):
                out[s][j] = torch.empty_like(like, dtype=t.dtype).copy_(t)
            copied.append(j)
    yield out
    for j in copied:
        for s in written:
            slots[s][j].copy_(out[s][j])


def flat_addresses(
    slots: Sequence[Sequence[torch.Tensor]], align: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], bool]:
    """The data addresses of ``slots`` (int64, ``[slots, tensors]``, rows zero-padded to an even
    length so that each row starts 16-byte aligned), the element counts of the first slot, the
    columns that are not flat (see ``flat_ok``), and whether each slot holds one dtype, in one pass."""
    if _C is not None:
        return _C.flat_addresses(slots, align)
    pad = [0] * (len(slots[0]) % 2)
    addresses = torch.tensor([[t.data_ptr() for t in slot] + pad for slot in slots], dtype=torch.int64)
    numels = torch.tensor([t.numel() for t in slots[0]], dtype=torch.int64)
    not_flat = [j for j, column in enumerate(zip(*slots)) if not flat_ok(column, align)]
    return addresses, numels, not_flat, all(len({t.dtype for t in slot}) == 1 for slot in slots)


def new_momentum_buffers(params: Sequence[torch.Tensor], momentum_buffers: list) -> list[bool]:
    """Create missing buffers as zeros; return which are new (kernels give them b = g on this step)."""
    new = [b is None for b in momentum_buffers]
    for i, is_new in enumerate(new):
        if is_new:
            momentum_buffers[i] = new_state(params[i])
    return new


def momentum_slots(params, grads, momentum_buffers, momentum: float):
    """SGD's and LARS's slots in both kernel backends: params, grads and, with momentum, the buffers
    (created here when new). Returns the slots, the written ones, and the first-step flags (None without
    momentum)."""
    slots = {"params": params, "grads": grads}
    if momentum == 0:
        return slots, ("params",), None
    new = new_momentum_buffers(params, momentum_buffers)
    slots["momentum_buffers"] = momentum_buffers
    return slots, ("params", "momentum_buffers"), new


def compensation_slot(rounding: Rounding | None) -> dict[str, list[torch.Tensor]]:
    """kahan's int16 compensations as a slot of both kernel backends (copied with their parameters when
    those are not flat); empty for other roundings."""
    if rounding is not None and rounding.mode == "kahan":
        return {"compensations": list(rounding.compensations)}
    return {}
