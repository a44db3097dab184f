"""The ``cpu`` backend: thin wrappers over the C++ extension ``fused_ft._C`` built from csrc/."""
from __future__ import annotations

try:
    from fused_ft import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # no compiler at install time, or an ABI mismatch with this torch
    _C = None
    _IMPORT_ERROR = str(exc)


def unavailable_reason() -> str | None:
    if _C is None:
        return (
            f"backend='cpu' needs the C++ extension fused_ft._C, which could not be loaded ({_IMPORT_ERROR}); "
            "install a C++ compiler and reinstall: pip install --no-build-isolation -e ."
        )
    return None
