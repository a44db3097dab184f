"""Optional dependencies: the optimizers need torch alone; models need ``fused_ft[vision]`` (timm,
open_clip_torch) and plots ``fused_ft[plots]`` (matplotlib). A feature whose extra is missing says in
one line which extra to install; the command line prints that line and exits with status 2.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "missing_extra", "require"]

# top-level module -> (distribution, extra that installs it)
EXTRAS = {
    "timm": ("timm", "vision"),
    "open_clip": ("open_clip_torch", "vision"),
    "torchvision": ("torchvision", "vision"),  # image folders and transforms of the fine-tuning data
    "PIL": ("pillow", "vision"),
    "matplotlib": ("matplotlib", "plots"),
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency of the feature is not installed; the message names the extra."""


def missing_extra(exc: ImportError, what: str | None = None) -> MissingExtraError | None:
    """The one-line error for ``exc`` when it is a missing optional dependency, else None (a module that
    is installed but broken, or a module that is no extra's, keeps its own error)."""
    if isinstance(exc, MissingExtraError):
        return exc
    top = (getattr(exc, "name", None) or "").split(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or top not in EXTRAS:
        return None
    distribution, extra = EXTRAS[top]
    needs = f"{what} needs {distribution}" if what else f"{distribution} is needed here"
    return MissingExtraError(f"{needs}, which is not installed: pip install 'fused_ft[{extra}]'", name=top)


def require(module: str, what: str) -> ModuleType:
    """``module`` imported, or :class:`MissingExtraError` naming the extra that installs it.

    Example: ``timm = require("timm", "building a timm model")``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        error = missing_extra(exc, what)
        if error is None:
            raise
        raise error from None
