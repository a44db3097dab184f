"""How ``fused_ft._C`` is compiled: the one description that the ahead-of-time build (setup.py) and the
just-in-time build (:mod:`fused_ft.kernels._jit`) share, so that both compile the same sources with the same flags.

This file imports neither torch nor fused_ft: setup.py loads it by path, where neither may be importable.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["EXTRA_CFLAGS", "EXTRA_LDFLAGS", "csrc_dir", "simd_flags", "sources"]

EXTRA_CFLAGS = ["-O3", "-fopenmp"]
EXTRA_LDFLAGS = ["-fopenmp"]


def simd_flags() -> list[str]:
    """AVX2+FMA+F16C for at::vec where the building CPU has them (the extension is built where it runs;
    ``FUSED_FT_PORTABLE=1`` leaves them out, for a build that runs on other machines)."""
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("FUSED_FT_PORTABLE") == "1":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    if all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c")):  # c10::Half converts with F16C under AVX2
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def csrc_dir(package_dir: Path) -> Path | None:
    """Where the C++ sources are: ``fused_ft/csrc`` in an installed wheel (setup.py copies them there),
    the repository's ``csrc/`` in a source tree or an editable install; None where neither holds them."""
    for candidate in (package_dir / "csrc", package_dir.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def sources(directory: Path) -> list[Path]:
    """The translation units of the extension, in a stable order."""
    return sorted(directory.glob("*.cpp"))
