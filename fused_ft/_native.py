"""The C++ extension ``fused_ft._C`` (built from csrc/), or None where it could not be built or loaded.

It holds the ``cpu`` backend's kernels and two host-side helpers of a step (``params_with_grads``,
``flat_addresses``). Every user of a helper keeps a pure-Python fallback; only ``backend='cpu'``
needs the extension itself.
"""
from __future__ import annotations

try:
    from fused_ft import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # no compiler at install time, or an ABI mismatch with this torch
    _C = None
    IMPORT_ERROR = str(exc)

__all__ = ["_C", "IMPORT_ERROR"]
