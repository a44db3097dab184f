"""Build script: metadata lives in pyproject.toml (PEP 621); this file builds the C++ extension.

``fused_ft._C`` (csrc/) is built ahead of time when torch is importable at build time and a C++ compiler
works (``pip install --no-build-isolation -e .``, as ``make`` does). Otherwise (pip's default build
isolation has no torch) the package ships the C++ sources, and ``fused_ft.kernels.native`` builds them just in
time on first import, against the torch that runs, with the same flags (``fused_ft/kernels/_build.py``).
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_build_module():
    """fused_ft/kernels/_build.py by path: importing the package would import torch, which may be absent here."""
    spec = importlib.util.spec_from_file_location("fused_ft_build", ROOT / "fused_ft" / "kernels" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()


def _warn(message: str) -> None:
    print(f"WARNING: fused_ft: {message}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (fused_ft/csrc), for the just-in-time build of an installed wheel;
    csrc/ at the top stays the one copy in the repository. An editable install reads csrc/ in place."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fused_ft" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted((ROOT / "csrc").iterdir()):
            if path.suffix in (".cpp", ".h"):
                shutil.copy2(path, target / path.name)


def _extension_kwargs() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _warn("torch is not importable at build time, so the C++ kernels are built just in time on first "
              "import instead (once, cached; see the README's Install section)")
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
        sources=[os.path.relpath(p, ROOT) for p in _build.sources(ROOT / "csrc")],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=[*_build.EXTRA_CFLAGS, *_build.simd_flags()],
        extra_link_args=list(_build.EXTRA_LDFLAGS),
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


_kwargs = _extension_kwargs()
_kwargs["cmdclass"] = {**_kwargs.get("cmdclass", {}), "build_py": BuildPyWithSources}
setup(**_kwargs)
