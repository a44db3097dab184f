"""Build script: metadata lives in pyproject.toml (PEP 621); this file builds the C++ extension.

``fused_ft._C`` (csrc/) is built when torch is importable at build time and a C++ compiler works
(``pip install --no-build-isolation -e .``, as ``make`` does). Otherwise fused_ft installs without
it and the ``cpu`` backend reports why it is unavailable; ``auto`` then uses the reference backend.
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup


def _warn(message: str) -> None:
    print(f"WARNING: fused_ft: {message}", file=sys.stderr)


def _simd_flags() -> list:
    """AVX2+FMA+F16C for at::vec where the building CPU has them (the extension is built where it runs)."""
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


def _extension_kwargs() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _warn("torch is not importable at build time, so the C++ kernels are not built; "
              "install torch first and run: pip install --no-build-isolation -e .")
        return {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _warn(f"no C++ compiler ({compiler!r}) found, so the C++ kernels are not built; backend='cpu' "
              "will be unavailable and backend='auto' uses the reference backend")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile warns and installs the pure-Python package instead of failing the install."""

        failed: set = set()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler errors surface as several distutils/setuptools types
                self.failed.add(ext.name)
                _warn(f"building the C++ kernels failed ({exc}); backend='cpu' will be unavailable")

        def get_outputs(self):
            return [out for out, ext in zip(super().get_outputs(), self.extensions) if ext.name not in self.failed]

        def copy_extensions_to_source(self):
            self.extensions = [ext for ext in self.extensions if ext.name not in self.failed]
            super().copy_extensions_to_source()

    extension = CppExtension(
        "fused_ft._C",
        sources=sorted(glob.glob("csrc/*.cpp")),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=["-O3", "-fopenmp", *_simd_flags()],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_extension_kwargs())
