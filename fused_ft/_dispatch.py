"""The one place that decides which implementation runs an update.

Backends: ``reference`` (pure torch, the numerical oracle, always available), ``triton`` (GPU
kernels; on CPU only under ``TRITON_INTERPRET=1``), ``cpu`` (the C++ extension built from
``csrc/``). ``auto`` picks the fastest backend that is available for the parameters' device and
supports the group's options. A backend asked for by name that cannot run raises with the reason
and the fix; nothing ever falls back silently.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "check_backend_name", "resolve"]

BACKENDS = ("auto", "reference", "triton", "cpu")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why and what to do."""


@functools.lru_cache(maxsize=None)
def _module(name: str):
    """A backend module, imported once (resolve runs for every group on every step)."""
    return importlib.import_module(name)


@dataclass(frozen=True)
class _Backend:
    name: str
    module: str  # ``{opt}`` is replaced by the optimizer's name, in both module and attr
    attr: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this backend can run on ``device``, else a sentence saying why not and how to fix it."""
        if self.name == "reference":
            return None
        if self.name == "triton":
            interpret = os.environ.get("TRITON_INTERPRET") == "1"
            if device.type == "cuda" and not interpret and not torch.cuda.is_available():
                return "backend='triton' needs a CUDA device, and torch sees none (torch.cuda.is_available() is False)"
            if device.type != "cuda" and not interpret:
                return (
                    f"backend='triton' needs CUDA tensors, but the parameters are on {device}; "
                    "use backend='auto' or 'cpu', or set TRITON_INTERPRET=1 to run the kernels in "
                    "Triton's (slow) CPU interpreter"
                )
            if "triton" in sys.modules:  # every step asks: skip the import machinery once imported
                return None
            try:
                importlib.import_module("triton")
            except ImportError as exc:
                return f"backend='triton' needs the triton package ({exc}); pip install triton"
            return None
        if self.name == "meta":
            from fused_ft.kernels import meta

            return meta.unavailable_reason(device)
        if self.name == "cpu":
            if device.type != "cpu":
                return f"backend='cpu' runs on CPU tensors, but the parameters are on {device}; use backend='auto'"
            from fused_ft.kernels import cpu as cpu_kernels  # imported lazily: it loads the extension

            return cpu_kernels.unavailable_reason()
        raise AssertionError(self.name)

    def implementation(self, optimizer: str) -> Callable[..., None]:
        return getattr(_module(self.module.format(opt=optimizer)), self.attr.format(opt=optimizer))

    def unsupported_reason(
        self, optimizer: str, options: Mapping[str, Any], dtypes: frozenset[torch.dtype]
    ) -> str | None:
        """None when this backend implements every option of the group and its dtypes, else what it lacks."""
        check = getattr(_module(self.module.format(opt=optimizer)), "unsupported_reason", None)
        return check(optimizer, options, dtypes) if check is not None else None

    def helper(self, optimizer: str, name: str) -> Callable[..., Any]:
        """A backend's companion function, e.g. LAMB's global clipping: ``<attr>_<name>``."""
        return getattr(_module(self.module.format(opt=optimizer)), f"{self.attr.format(opt=optimizer)}_{name}")


_REGISTRY = {
    "reference": _Backend("reference", "fused_ft.optim.{opt}", "_reference_{opt}"),
    "triton": _Backend("triton", "fused_ft.kernels.triton_launch", "{opt}"),
    "cpu": _Backend("cpu", "fused_ft.kernels.cpu", "{opt}"),
    # not in BACKENDS: only auto picks it, for meta tensors (fused_ft.memory's simulated mode)
    "meta": _Backend("meta", "fused_ft.kernels.meta", "{opt}"),
}
# auto's preference per device type: fastest first; reference always closes the list.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference"), "meta": ("meta",)}


_WARNED: set = set()


def _warn_once(name: str, device: torch.device, reason: str) -> None:
    """auto's preferred kernels are missing on this machine: say so once, not every step."""
    if (name, device.type) not in _WARNED:
        _WARNED.add((name, device.type))
        warnings.warn(f"{reason}; falling back to backend='reference'", UserWarning, stacklevel=4)


def check_backend_name(backend: Any) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (choose from {', '.join(BACKENDS)})")
    return backend


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` on this machine, fastest first."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("reference",))
    names = list(dict.fromkeys(order + ("triton", "cpu", "reference")))
    return [n for n in names if n in BACKENDS and _REGISTRY[n].unavailable_reason(device) is None]


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` (a name, or ``auto``) cannot run on ``device`` here, or None when it can."""
    return None if backend == "auto" else _REGISTRY[backend].unavailable_reason(device)


def helper(backend: str, optimizer: str, name: str) -> Callable[..., Any]:
    """A resolved backend's companion function (``backend`` is a concrete name, not ``auto``)."""
    return _REGISTRY[backend].helper(optimizer, name)


def resolve(
    backend: str,
    optimizer: str,
    device: torch.device,
    options: Mapping[str, Any],
    dtypes: frozenset[torch.dtype] = frozenset(),
) -> tuple[str, Callable[..., None]]:
    """The backend name and update function for one param group's tensors on ``device``."""
    if backend != "auto":
        chosen = _REGISTRY[backend]
        reason = chosen.unavailable_reason(device) or chosen.unsupported_reason(optimizer, options, dtypes)
        if reason is not None:
            raise BackendUnavailableError(reason)
        return backend, chosen.implementation(optimizer)
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        candidate = _REGISTRY[name]
        reason = candidate.unavailable_reason(device)
        if reason is not None:
            _warn_once(name, device, reason)
            continue
        if candidate.unsupported_reason(optimizer, options, dtypes) is None:
            return name, candidate.implementation(optimizer)
    raise AssertionError("the reference backend runs everywhere")
