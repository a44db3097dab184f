"""Optimizer state as a step reads it: which tensors each parameter holds, gathered and checked in the
plan phase, so that a step that raises has changed nothing.

Each optimizer names its state as ``Slot``s for a group's options (AdamW with amsgrad reads three
moments and a step count). The plan phase gathers one column per slot (``None`` where a parameter has
no such tensor yet) and checks every present tensor against its parameter: shape, device, dtype, and
that slots created together are all there (one C++ pass, ``csrc/state_tables.cpp``, where built).
The update phase then creates what is missing:

- a parameter without any state starts afresh, as torch.optim starts a new parameter;
- a slot created on its own (``together=False``) is created when missing although its neighbours
  exist: SGD's momentum buffer when momentum is turned on mid-run (torch's rule: it starts at the
  next gradient), AdamW's ``max_exp_avg_sq`` when amsgrad is turned on (zeros: the running maximum
  starts at the next step's second moment), kahan's compensation when ``bf16_update`` turns to kahan;
- a slot missing beside others created with it (``exp_avg`` without ``exp_avg_sq``) is refused: no
  choice would continue the run the state came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fused_ft.kernels.native import _C
from fused_ft._precision import COMPENSATION_KEY, LOW_PRECISION

__all__ = ["Slot", "COMPENSATION", "gather"]

_PROBLEMS = {1: "shape", 2: "device", 3: "dtype"}
_KINDS = {"moment": 0, "compensation": 1, "step": 2}


@dataclass(frozen=True)
class Slot:
    """One state tensor per parameter: ``kind`` is ``"moment"`` (the parameter's shape and device, fp32
    for bf16/fp16 parameters, else the parameter's dtype), ``"compensation"`` (int16, the parameter's
    shape: kahan's) or ``"step"`` (one floating element); ``together``: created with the parameter's
    other ``together`` slots, so present with all of them or none."""

    key: str
    kind: str = "moment"
    together: bool = True


COMPENSATION = Slot(COMPENSATION_KEY, kind="compensation", together=False)  # kahan's, for bf16 parameters


def gather(state: dict, group_index: int, group: dict, params: Sequence[torch.Tensor],
           slots: Sequence[Slot]) -> dict[str, list]:
    """One list per slot key: each parameter's tensor, or None where it has none (nothing is created),
    after checking every present tensor against its parameter: a ``ValueError`` naming the group, the
    parameter's index in it, its shape, the key and the fix, with nothing changed."""
    if not slots:
        return {}
    if _C is not None and isinstance(params, list) and not torch.compiler.is_compiling():  # Dynamo traces the twin
        lists, problem = _C.gather_state(state, params, [s.key for s in slots], [_KINDS[s.kind] for s in slots],
                                         [s.together for s in slots])
    else:
        lists = [[] for _ in slots]
        for p in params:
            p_state = state.get(p)
            for s, column in zip(slots, lists):
                value = None if p_state is None else p_state.get(s.key)
                column.append(value)
        problem = _first_mismatch(params, lists, slots)
    if problem[2]:
        _refuse(group_index, group, params, lists, slots, *problem)
    return {s.key: column for s, column in zip(slots, lists)}


def _expected_dtype(slot: Slot, p: torch.Tensor) -> torch.dtype | None:
    if slot.kind == "compensation":
        return torch.int16
    if slot.kind == "step":
        return None
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def _first_mismatch(params, columns, slots) -> tuple[int, int, int]:
    """Python twin of csrc/state_tables.cpp's checks (used where the extension is not built)."""
    for j, p in enumerate(params):
        present = absent = -1
        for s, slot in enumerate(slots):
            t = columns[s][j]
            if t is None:
                if slot.together and absent < 0:
                    absent = s
                continue
            if slot.together and present < 0:
                present = s
            if not isinstance(t, torch.Tensor):
                return s, j, 5
            if slot.kind == "step":
                if t.numel() != 1:
                    return s, j, 1
                if not t.is_floating_point():
                    return s, j, 3
                continue
            if t.shape != p.shape:
                return s, j, 1
            if t.device != p.device:
                return s, j, 2
            if t.dtype != _expected_dtype(slot, p):
                return s, j, 3
        if present >= 0 and absent >= 0:
            return absent, j, 4
    return -1, -1, 0


def _refuse(group_index: int, group: dict, params, lists, slots, s: int, j: int, problem: int) -> None:
    slot, p, t = slots[s], params[j], lists[s][j]
    index = next(i for i, q in enumerate(group["params"]) if q is p)
    where = f"group {group_index} param {index} (shape {tuple(p.shape)}, {p.dtype}, {p.device})"
    fix = (f"load a state dict saved from these parameters, or `del optimizer.state[param]` "
           f"(optimizer.param_groups[{group_index}]['params'][{index}]) to start its state afresh")
    if problem == 4:
        present = [x.key for x, column in zip(slots, lists) if x.together and column[j] is not None]
        raise ValueError(f"Invalid state: {where} has {', '.join(map(repr, present))} but no {slot.key!r}; {fix}")
    if slot.kind == "step" and (problem == 5 or problem in (1, 3)):
        what = f"{t!r}" if problem == 5 else f"a tensor of {t.numel()} elements, {t.dtype}"
        raise ValueError(f"Invalid state: {where} has state[{slot.key!r}] = {what} (must be a one-element "
                         f"floating tensor, e.g. torch.tensor(3.0)); {fix}")
    if problem == 5:
        raise ValueError(f"Invalid state: {where} has state[{slot.key!r}] = {t!r} (must be a tensor shaped like "
                         f"its parameter); {fix}")
    what = _PROBLEMS[problem]
    found = {"shape": tuple(t.shape), "device": t.device, "dtype": t.dtype}[what]
    expected = {"shape": tuple(p.shape), "device": p.device, "dtype": _expected_dtype(slot, p)}[what]
    hint = ""
    if problem in (2, 3):
        hint = ("; after moving or casting the model, optimizer.load_state_dict(optimizer.state_dict()) "
                "moves the state too")
    raise ValueError(f"Invalid state: {where} has state[{slot.key!r}] with {what} {found}, expected {expected}; "
                     f"{fix}{hint}")
