"""The one place that decides which implementation runs an update.

Backends: ``reference`` (pure torch, the numerical oracle, always available), ``triton`` (GPU
kernels; on CPU only under ``TRITON_INTERPRET=1``), ``cpu`` (the C++ extension built from
``csrc/``). ``auto`` picks the fastest backend that is available for the parameters' device and
supports the group's options. A backend asked for by name that cannot run raises with the reason
and the fix; nothing ever falls back silently.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any, Callable, Mapping

import torch

from fused_ft.kernels import native

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "check_backend_name", "lamb_clip",
           "resolve", "scaler_in_kernel", "unavailable_reason"]

BACKENDS = ("auto", "reference", "triton", "cpu")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why and what to do."""


# Backend name -> its module. Every backend module has the same interface: ``unavailable_reason(device)``,
# ``unsupported_reason(optimizer, options, dtypes)``, ``UPDATES``, a table from update name ("sgd",
# "adamw", "lars", "lamb", and LAMB's global clip "lamb_clip") to the function that runs it, and
# ``SCALER_IN_KERNEL``, the updates whose kernels take GradScaler's grad_scale and found_inf.
_MODULES = {
    "reference": "fused_ft.kernels.reference",
    "triton": "fused_ft.kernels.triton_launch",
    "cpu": "fused_ft.kernels.cpu",
    # not in BACKENDS: only auto picks it, for meta tensors (fused_ft.memory's simulated mode)
    "meta": "fused_ft.kernels.meta",
}
_INSTALL_HINTS = {"triton": "pip install triton"}
# auto's preference per device type: fastest first; reference always closes the list.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference"), "meta": ("meta",)}


def _module(name: str):
    """A backend's module, imported on first use, then read from ``sys.modules`` (resolve runs for every group
    on every step): no import runs in a step that torch.compile traces, since Dynamo cannot trace one (it traces
    through an ``lru_cache`` to the import it wraps)."""
    module = sys.modules.get(_MODULES[name])
    return module if module is not None else importlib.import_module(_MODULES[name])


def _unavailable(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else a sentence saying why not and how to fix it."""
    try:
        module = _module(name)
    except ImportError as exc:
        hint = _INSTALL_HINTS.get(name, "reinstall fused_ft")
        return f"backend={name!r} could not be imported ({exc}); {hint}"
    return module.unavailable_reason(device)


_WARNED: set = set()


def _warn_once(name: str, device: torch.device, reason: str) -> None:
    """auto's preferred kernels are missing on this machine: say so once, not every step."""
    if (name, device.type) not in _WARNED:
        _WARNED.add((name, device.type))
        if name == "cpu" and native.INFO.warned:  # the import said why, what it costs and the fix
            return
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
    return [n for n in names if n in BACKENDS and _unavailable(n, device) is None]


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` (a name, or ``auto``) cannot run on ``device`` here, or None when it can."""
    return None if backend == "auto" else _unavailable(backend, device)


def scaler_in_kernel(backend: str, optimizer: str) -> bool:
    """Do backend ``backend``'s (a concrete name) kernels for ``optimizer`` take GradScaler's grad_scale and
    found_inf (its module's ``SCALER_IN_KERNEL``)?"""
    return optimizer in _module(backend).SCALER_IN_KERNEL


def lamb_clip(backend: str) -> Callable[..., Any]:
    """LAMB's global gradient clipping as backend ``backend`` (a concrete name, not ``auto``) computes it."""
    return _module(backend).UPDATES["lamb_clip"]


def resolve(
    backend: str,
    optimizer: str,
    device: torch.device,
    options: Mapping[str, Any],
    dtypes: frozenset[torch.dtype] = frozenset(),
) -> tuple[str, Callable[..., None]]:
    """The backend name and update function for one param group's tensors on ``device``."""
    if backend != "auto":
        reason = _unavailable(backend, device) or _module(backend).unsupported_reason(optimizer, options, dtypes)
        if reason is not None:
            raise BackendUnavailableError(reason)
        return backend, _module(backend).UPDATES[optimizer]
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        reason = _unavailable(name, device)
        if reason is not None:
            _warn_once(name, device, reason)
            continue
        module = _module(name)
        if module.unsupported_reason(optimizer, options, dtypes) is None:
            return name, module.UPDATES[optimizer]
    raise AssertionError("the reference backend runs everywhere")
