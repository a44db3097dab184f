"""Loading state dicts and unpickling optimizers: torch.optim's ``Optimizer`` does the work, and this
module adds what fused_ft's state needs, so that every optimizer gets it from ``FusedOptimizer``.

- fp32 state of bf16/fp16 parameters comes back bit for bit. torch's ``load_state_dict`` casts every
  floating state tensor to its parameter's dtype (``Optimizer._process_value_according_to_param_policy``,
  called on the class, so no override reaches it), which rounds fp32 moments to bf16; kahan's int16
  compensations would become bf16 numbers the same way. Both are set aside before torch's cast and put
  back, converted only where the format needs it: a torch checkpoint of bf16 parameters holds bf16
  state, which widens to fp32 exactly.
- A state dict saved from other parameters (another model, other groups) is refused before anything
  changes, naming the group, the parameter index, both shapes and the fix (torch loads it and fails
  at the next step).
- Implementation flags (``fused``, ``foreach``, ``capturable``, ``differentiable``) say how the saver
  ran, not how the loader must run: the loading optimizer keeps its own, so a checkpoint of
  ``torch.optim.AdamW(fused=True)`` or a CUDA ``capturable=True`` one continues on any backend (torch
  would load the saver's flags, and fused_ft would then refuse its next step for an argument the user
  never gave).
- Older formats load as torch.optim and timm.optim load them: a step count saved as a plain number
  (torch before 1.12, older timm Lamb's group step) becomes a float32 CPU tensor, and group keys that
  the saving version did not have take the class's defaults.
"""
from __future__ import annotations

import functools
import inspect
from itertools import chain
from typing import Any

import torch

from fused_ft._precision import COMPENSATION_KEY, LOW_PRECISION

__all__ = ["check_loadable", "set_aside_exact_state", "put_back_exact_state", "drop_torch_default", "upgrade",
           "implementation_flags", "restore_implementation_flags"]

IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")

_PHRASE_GROUPS = "loaded state dict has a different number of parameter groups"  # torch's words, kept in ours
_PHRASE_SIZES = "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"


def _id_map(optimizer, state_dict: dict) -> dict[Any, torch.Tensor]:
    """Saved parameter ids to this optimizer's parameters, paired in order as torch pairs them."""
    saved = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    return dict(zip(saved, chain.from_iterable(g["params"] for g in optimizer.param_groups)))


def _where(optimizer, p: torch.Tensor) -> str:
    for g, group in enumerate(optimizer.param_groups):
        for i, q in enumerate(group["params"]):
            if q is p:
                return f"group {g} param {i} (shape {tuple(p.shape)})"
    raise AssertionError("a parameter of the optimizer")


def check_loadable(optimizer, state_dict: dict) -> None:
    """Refuse a state dict that does not belong to these parameters (``ValueError``), before any change."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"Invalid state_dict: {keys} (must be a dict with 'state' and 'param_groups', "
                         "as optimizer.state_dict() returns)")
    saved, groups = state_dict["param_groups"], optimizer.param_groups
    fix = "build the optimizer over the same parameters, in the same groups and order, as the one that saved it"
    if len(saved) != len(groups):
        raise ValueError(f"Invalid state_dict: {len(saved)} param groups, this optimizer has {len(groups)} "
                         f"({_PHRASE_GROUPS}); {fix}")
    for g, (s, group) in enumerate(zip(saved, groups)):
        if len(s["params"]) != len(group["params"]):
            raise ValueError(f"Invalid state_dict: group {g} has {len(s['params'])} parameters, this optimizer's "
                             f"group {g} has {len(group['params'])} ({_PHRASE_SIZES}); {fix}")
    element_keys = (*optimizer._ELEMENT_STATE, COMPENSATION_KEY)
    for k, p in _id_map(optimizer, state_dict).items():
        entry = state_dict["state"].get(k)
        if not isinstance(entry, dict):
            continue
        for key in element_keys:
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise ValueError(
                    f"Invalid state_dict: {_where(optimizer, p)} would get state[{key!r}] of shape "
                    f"{tuple(value.shape)}: the state dict was saved from other parameters; {fix}"
                )


def _kept_exact(p: torch.Tensor, key: Any, value: Any) -> bool:
    """State that torch's cast would damage: floating state of low-precision parameters, compensations."""
    if not isinstance(value, torch.Tensor) or key == "step":
        return False
    return key == COMPENSATION_KEY or (p.dtype in LOW_PRECISION and value.is_floating_point())


def set_aside_exact_state(optimizer, state_dict: dict) -> tuple[dict, list]:
    """A shallow copy of ``state_dict`` without the tensors that torch's cast would damage, and those
    tensors (with each entry's key order), for ``put_back_exact_state``. The caller's dict is not changed."""
    kept = []
    state = dict(state_dict["state"])
    for k, p in _id_map(optimizer, state_dict).items():
        entry = state.get(k)
        exact = {key: v for key, v in entry.items() if _kept_exact(p, key, v)} if isinstance(entry, dict) else {}
        if not exact:
            continue
        state[k] = {key: v for key, v in entry.items() if key not in exact}
        kept.append((p, list(entry), exact))
    return {**state_dict, "state": state}, kept


def put_back_exact_state(optimizer, kept: list) -> None:
    """Insert what ``set_aside_exact_state`` kept, as copies on each parameter's device: fp32 for
    floating state (bf16 or fp16 state from a torch checkpoint widens exactly), compensations as saved."""
    for p, order, exact in kept:
        entry = optimizer.state[p]
        entry.update((key, v.to(device=p.device, dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True))
                     for key, v in exact.items())
        ordered = {key: entry.pop(key) for key in order if key in entry}  # the saved order, then anything new
        ordered.update(entry)
        entry.clear()
        entry.update(ordered)


def implementation_flags(optimizer) -> list[dict[str, Any]]:
    """Each group's implementation flags, as the optimizer holds them before a load."""
    return [{key: group[key] for key in IMPLEMENTATION_FLAGS if key in group} for group in optimizer.param_groups]


def restore_implementation_flags(optimizer, flags: list[dict[str, Any]]) -> None:
    """After a load: each group's own flags again, and none that only the saver's groups had."""
    for group, own in zip(optimizer.param_groups, flags):
        for key in IMPLEMENTATION_FLAGS:
            if key in own:
                group[key] = own[key]
            else:
                group.pop(key, None)


def _as_step_tensor(value: Any) -> torch.Tensor:
    """A step count as fused_ft keeps it (torch.optim's non-fused format): a floating CPU tensor (float32
    from a number or an integer tensor); a tensor that is one already is kept as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", dtype=value.dtype if value.is_floating_point() else torch.float32)
    return torch.tensor(float(value), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _signature_defaults(cls: type) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


# fused_ft's own constructor arguments: missing from torch/timm state dicts, they take this optimizer's values
_OWN_KEYS = frozenset({"frozen", "bf16_update", "bf16_seed"})


def drop_torch_default(optimizer) -> None:
    """Undo what torch's ``Optimizer.__setstate__`` adds to the defaults of a class that has no
    ``differentiable`` argument (LARS, LAMB): groups added after a load or a copy would carry the key
    and the state dict would differ from the original's (timm's LARS and LAMB have this quirk)."""
    if "differentiable" not in _signature_defaults(type(optimizer)):
        optimizer.defaults.pop("differentiable", None)


def upgrade(optimizer) -> None:
    """After ``__setstate__`` (a load or an unpickling): step counts as tensors, and every key of the
    optimizer's defaults present in every group. Missing keys take the class's signature default, as
    torch.optim's and timm's ``__setstate__`` do, or this optimizer's default where the signature has
    none or the key is fused_ft's own (``frozen``, ``bf16_*``, ``max_lr_snapshot``)."""
    signature = _signature_defaults(type(optimizer))
    for group in optimizer.param_groups:
        for key, value in optimizer.defaults.items():
            if key not in group:
                group[key] = value if key in _OWN_KEYS or key not in signature else signature[key]
        if "step" in group:
            group["step"] = _as_step_tensor(group["step"])
        for p in group["params"]:
            entry = optimizer.state.get(p)
            if entry and "step" in entry:
                entry["step"] = _as_step_tensor(entry["step"])
