"""The C++ extension ``fused_ft._C`` (built from csrc/), or None where it could not be built or loaded.

It holds the ``cpu`` backend's kernels and the host-side helpers of a step (``params_with_grads``,
``flat_addresses``, ``increment_steps``, ``gather_state``). Every user of a helper keeps a pure-Python
fallback; only ``backend='cpu'`` needs the extension itself.

Where it comes from, first that works:

1. built ahead of time by setup.py, when torch was importable at build time
   (``pip install --no-build-isolation``, as ``make`` does);
2. built just in time, on first import, against the torch that is running (:mod:`fused_ft.kernels._jit`,
   cached; ``FUSED_FT_BUILD=0`` turns it off).

Where neither works, one :class:`NativeExtensionWarning` names the cost and the fix.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = ["_C", "IMPORT_ERROR", "INFO", "NativeExtensionWarning", "ExtensionInfo", "fix", "jit_arguments"]


class NativeExtensionWarning(UserWarning):
    """fused_ft runs without its C++ extension: slower steps and no ``cpu`` backend."""


@dataclass(frozen=True)
class ExtensionInfo:
    """What :mod:`fused_ft.doctor` reports about the extension."""

    origin: str | None  # "ahead of time", "just in time", or None where it is not loaded
    path: str | None
    torch_version: str | None  # the torch it was compiled against
    error: str | None  # why it is not loaded
    warned: bool = False  # a NativeExtensionWarning said why, what it costs and how to fix it


def fix(error: str | None) -> str:
    """How to get the extension, for the reason ``error`` that it is not loaded."""
    if error is not None and "FUSED_FT_BUILD=0" in error:
        return "unset FUSED_FT_BUILD, and the next import builds it just in time (once)"
    return ("install a C++ compiler and ninja, then import fused_ft again (it builds once, just in time), or install "
            "it with torch importable at build time: pip install --no-build-isolation fused_ft")


def _cost_and_fix(reason: str) -> str:
    return (f"fused_ft's C++ extension is unavailable: {reason}. Without it backend='cpu' is unavailable "
            "(auto uses 'reference' on CPU) and the host work of every step (params_with_grads, flat_addresses, "
            f"increment_steps, gather_state) runs in Python, several times slower per step. Fix: {fix(reason)}")


def jit_arguments() -> dict:
    """What :func:`fused_ft.kernels._jit.load` builds ``fused_ft._C`` from: setup.py's sources and flags."""
    from fused_ft.kernels import _build, _jit

    # the package folder (fused_ft/, one above kernels/): an installed wheel holds csrc/ there
    source_dir = _build.csrc_dir(Path(__file__).resolve().parents[1])
    if source_dir is None:
        raise _jit.BuildFailed("its C++ sources are not part of this installation")
    return dict(name="_C", sources=_build.sources(source_dir), headers=sorted(source_dir.glob("*.h")),
                cflags=[*_build.EXTRA_CFLAGS, *_build.simd_flags()], ldflags=list(_build.EXTRA_LDFLAGS))


def _load() -> tuple[object | None, ExtensionInfo]:
    try:
        from fused_ft import _C as aot  # type: ignore[attr-defined]

        return aot, ExtensionInfo("ahead of time", aot.__file__, getattr(aot, "torch_version", None), None)
    except ImportError as exc:
        # a wheel built without torch has no _C; one built against another torch fails to link
        aot_error = None if "cannot import name '_C'" in str(exc) else str(exc)
    if os.environ.get("FUSED_FT_BUILD", "1") == "0":
        why = "FUSED_FT_BUILD=0 turned the just-in-time build off"
        return None, ExtensionInfo(None, None, None, why if aot_error is None else f"{aot_error}; {why}")
    from fused_ft.kernels import _jit

    try:
        module, directory = _jit.load(**jit_arguments())
    except Exception as exc:  # BuildFailed, or a cached library that no longer imports
        reason = str(exc) if isinstance(exc, _jit.BuildFailed) else f"loading the cached build failed ({exc})"
        warnings.warn(_cost_and_fix(reason), NativeExtensionWarning, stacklevel=2)
        return None, ExtensionInfo(None, None, None, reason, warned=True)
    return module, ExtensionInfo("just in time", module.__file__, getattr(module, "torch_version", None), None)


_C, INFO = _load()
IMPORT_ERROR: str | None = INFO.error
