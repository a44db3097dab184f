"""Argument checks shared by every optimizer, so that all errors read the same way.

Every message names the argument and the offending value (``Invalid lr: -0.1 (must be >= 0)``);
tests match these messages by regex. Checks never mutate anything, so a failed check leaves the
optimizer exactly as it was.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["Rule", "check_group", "check_params", "check_positive_int", "check_positive_number", "check_output_dir",
           "scalar_value", "step_scalar"]


def scalar_value(value: Any) -> float:
    """A hyperparameter as a Python float (a 1-element tensor lr is read once, here)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(()).cpu())
    return float(value)


def step_scalar(value: Any) -> Any:
    """A hyperparameter as a step uses it: ``scalar_value`` (a Python float, a double), except a tensor under
    torch.compile, which stays a 0-dim float64 tensor (the same double, computed on in the graph): reading it
    on the host would break the graph (``Tensor.item()``), and a value baked into the graph would recompile
    the step whenever a scheduler changes it. Derived scalars (bias corrections) are then computed in float64
    as the eager step computes them in Python doubles, and each backend narrows them to fp32 where the eager
    kernels do."""
    if isinstance(value, torch.Tensor):
        if torch.compiler.is_compiling():
            return value.detach().reshape(()).to(torch.float64)
        return value.item()  # one read (scalar_value's detach, reshape and copy cost 3 more dispatches a step)
    return float(value)


def check_positive_int(name: str, value: Any) -> None:
    """Counts the harness and profiler take (epochs, batch sizes): an int >= 1, never a bool."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 1)")


def check_positive_number(name: str, value: Any) -> None:
    """A finite number > 0 (a starting learning rate, a scale), never a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number > 0)")


def check_output_dir(name: str, path: Any) -> None:
    """A folder results will be written to: it, or the nearest of its parents that exists, must be a
    directory (mkdir and writing into it would fail only after the work)."""
    from pathlib import Path

    target = Path(path)
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == target else f" ({str(existing)!r} is a file)"
        raise ValueError(f"Invalid {name}: {str(path)!r} is not a directory{where}")


def _is_bool(value: Any) -> bool:
    """Python's and numpy's booleans (numbers.Integral counts Python's bool, not numpy's)."""
    return isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Rule:
    """What one hyperparameter accepts.

    ``low``/``high`` bound the value (``high_open`` makes the upper bound exclusive, as for betas);
    ``kind`` is ``"number"``, ``"bool"``, ``"optional_bool"``, ``"pair"`` (two numbers, e.g. betas) or
    ``"optional_number"`` (None allowed, e.g. LAMB's max_grad_norm), ``"int"`` (an int, not a bool) or
    ``"choice"`` (one of ``choices``); ``tensor_ok`` allows a 1-element tensor (torch accepts a tensor lr).
    """

    kind: str = "number"
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    tensor_ok: bool = False
    choices: tuple = ()

    def check(self, name: str, value: Any) -> None:
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(f"Invalid {name}: {value!r} (choose from {', '.join(map(repr, self.choices))})")
            return
        if self.kind == "int":
            if _is_bool(value) or not isinstance(value, numbers.Integral):
                raise TypeError(f"Invalid {name}: {value!r} (must be an int)")
            if self.low is not None and value < self.low:
                raise ValueError(f"Invalid {name}: {value} (must be >= {self.low:g})")
            return
        if self.kind == "bool":
            if not _is_bool(value):
                raise TypeError(f"Invalid {name}: {value!r} (must be a bool)")
            return
        if self.kind == "optional_bool":
            if value is not None and not _is_bool(value):
                raise TypeError(f"Invalid {name}: {value!r} (must be None or a bool)")
            return
        if self.kind == "optional_number" and value is None:
            return
        if self.kind == "pair":  # torch's types: a non-sequence is a TypeError, a wrong length a ValueError
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"Invalid {name}: {value!r} (must be a pair of numbers)")
            if len(value) != 2:
                raise ValueError(f"Invalid {name}: {value!r} (must be a pair of numbers)")
            for i, v in enumerate(value):
                if isinstance(v, torch.Tensor) and not self.tensor_ok:  # torch.optim: ValueError
                    raise ValueError(f"Invalid {name}[{i}]: {v!r} (a Tensor in {name} is not supported; pass floats)")
                self._check_number(f"{name}[{i}]", v)
            return
        self._check_number(name, value)

    def _check_number(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if not self.tensor_ok:
                raise TypeError(f"Invalid {name}: {value!r} (must be a float, not a Tensor)")
            if value.numel() != 1:
                raise ValueError(f"Invalid {name}: tensor with {value.numel()} elements (must be 1-element)")
            if torch.compiler.is_compiling():
                # a tensor's value is checked eagerly only, as torch.optim checks it: read in a compiled step it
                # would break the graph, and the graph would hold the value it checked, not the next one
                return
        elif _is_bool(value) or not isinstance(value, numbers.Real):  # numpy's scalars too, as torch.optim takes
            raise TypeError(f"Invalid {name}: {value!r} (must be a number)")
        x = scalar_value(value)
        shown = repr(value) if isinstance(value, torch.Tensor) else value  # f-strings print 0-dim tensors as floats
        if math.isnan(x):
            raise ValueError(f"Invalid {name}: {shown} (must not be NaN)")
        if self.low is not None and x < self.low:
            raise ValueError(f"Invalid {name}: {shown} (must be >= {self.low:g})")
        if self.high is not None and (x >= self.high if self.high_open else x > self.high):
            op = "<" if self.high_open else "<="
            raise ValueError(f"Invalid {name}: {shown} (must be {op} {self.high:g})")


NONNEG = Rule(low=0.0)
LR = Rule(low=0.0, tensor_ok=True)
BOOL = Rule(kind="bool")
OPTIONAL_BOOL = Rule(kind="optional_bool")
BETAS = Rule(kind="pair", low=0.0, high=1.0, high_open=True)
ANY_NUMBER = Rule()


def check_group(
    group: Mapping[str, Any],
    rules: Mapping[str, Rule],
    cross_checks: Sequence[Callable[[Mapping[str, Any]], None]] = (),
) -> None:
    """Check every hyperparameter of a param group (or of the defaults) against its rule."""
    for name, rule in rules.items():
        if name in group:
            rule.check(name, group[name])
    for cross in cross_checks:
        cross(group)


def check_params(params: Iterable[torch.Tensor], seen: set[int], group_index: int) -> None:
    """Refuse what torch.optim would silently accept or fail on later in ``step()``.

    ``seen`` holds the ids of parameters already in earlier groups; it is only read here, the
    caller adds to it once the whole group passed, so a refused group leaves nothing behind.
    """
    params = list(params)  # an empty group is accepted, as torch.optim and timm accept it (grouping helpers make them)
    ids: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"Invalid params: group {group_index} item {i} is {type(p).__name__}, not a Tensor")
        if not (p.is_floating_point()):
            raise TypeError(
                f"Invalid params: group {group_index} item {i} has dtype {p.dtype} "
                "(only floating-point parameters can be optimized)"
            )
        if id(p) in seen or id(p) in ids:
            raise ValueError(
                f"Invalid params: group {group_index} item {i} (shape {tuple(p.shape)}) "
                "appears in more than one place; each parameter may belong to one group once"
            )
        ids.add(id(p))
