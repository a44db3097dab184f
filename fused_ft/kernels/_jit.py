"""Building a C++ extension just in time, against the torch that is running, once per machine.

``pip install fused_ft`` with pip's default build isolation has no torch at build time, so no
``fused_ft._C`` is built ahead of time; :mod:`fused_ft.kernels.native` then calls :func:`load` on first import.
The build goes through ``torch.utils.cpp_extension.load`` (ninja) into its own folder of the cache
(``$FUSED_FT_CACHE/extensions``, by default ``~/.cache/fused_ft/extensions``), named by a
hash of everything that changes the binary: the sources and headers, the flags, the compiler, torch's
version and C++ ABI, and the Python version. A finished build leaves ``built.json`` there, and every
later process imports the library without calling the compiler.

Several processes that start at once (``torchrun`` with 8 ranks) take an OS file lock on that folder:
one builds, the others say once that they wait, then import what it built. The kernel drops the lock
of a process that dies, so a killed build blocks nobody (the next process builds again); the lock is
ours and not torch's because torch's own ``FileBaton`` in older releases of the supported range is a
file whose mere existence blocks, forever when its builder was killed.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

__all__ = ["BuildFailed", "build_directory", "cache_root", "load"]

MARKER = "built.json"


class BuildFailed(RuntimeError):
    """The extension could not be built; the message says why in one sentence."""


def cache_root() -> Path:
    """The folder that holds one subfolder per build: ``extensions`` in fused_ft's cache (``FUSED_FT_CACHE``,
    else ``~/.cache/fused_ft``, the folder the shift-lab data uses too)."""
    return Path(os.environ.get("FUSED_FT_CACHE", Path.home() / ".cache" / "fused_ft")).expanduser() / "extensions"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _key(name: str, files: list[Path], cflags: list[str], ldflags: list[str]) -> str:
    import torch

    digest = hashlib.sha256()
    for part in (name, torch.__version__, str(torch.version.git_version), str(torch._C._GLIBCXX_USE_CXX11_ABI),
                 sys.implementation.cache_tag, platform.machine(), _compiler(), *cflags, "|", *ldflags):
        digest.update(part.encode() + b"\0")
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(path: Path, waiting_message: str) -> Iterator[None]:
    """Hold an OS lock on ``path``; say ``waiting_message`` on stderr if another process holds it first."""
    with open(path, "a+b") as f:
        if sys.platform == "win32":  # pragma: no cover - the lock of the platforms without fcntl
            import msvcrt

            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    if waiting_message:
                        print(waiting_message, file=sys.stderr, flush=True)
                        waiting_message = ""
                    time.sleep(0.5)
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
            return
        import fcntl

        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(waiting_message, file=sys.stderr, flush=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from PATH; pip's ninja package puts it in the venv's bin, which is not on PATH
    when that venv's python is run without activating it."""
    import shutil

    saved = os.environ.get("PATH")
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, saved) if p)
        except (ImportError, AttributeError):
            pass  # torch's own check then says that ninja is missing
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.utils.cpp_extension logs warnings (no CUDA on a CPU-only machine, a compiler other than the one
    torch was built with) that are no news to the user of a C++-only build; its errors still raise."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _import(name: str, directory: Path):
    # torch.utils.cpp_extension.LIB_EXT, without importing that module (it logs about CUDA_HOME on import)
    path = directory / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BuildFailed(f"{path} is not an importable extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _failure(exc: BaseException, directory: Path) -> BuildFailed:
    """The build's error in one sentence: the cause a user can act on, not the compiler's pages."""
    import shutil

    text = str(exc).strip()
    if "ninja" in text.lower() and shutil.which("ninja") is None:
        return BuildFailed("ninja was not found to build it (pip install ninja)")
    lines = [line for line in text.splitlines() if "error" in line.lower()] or text.splitlines() or [type(exc).__name__]
    return BuildFailed(f"compiling it failed ({lines[0].strip()[:300]}; the build files are in {directory})")


def build_directory(name: str, files: list[Path], cflags: list[str], ldflags: list[str],
                    root: Path | None = None) -> Path:
    """The cache folder of one build: the torch version for a reader, the hash of all inputs for uniqueness."""
    import torch

    return (root or cache_root()) / f"{name}-torch{torch.__version__}-{_key(name, files, cflags, ldflags)}"


def load(name: str, sources: list[Path], headers: list[Path], cflags: list[str], ldflags: list[str],
         root: Path | None = None):
    """The extension ``name`` built from ``sources`` (with ``headers`` beside them), from the cache or
    built into it now. Returns ``(module, directory)``; raises :class:`BuildFailed`."""
    import torch

    files = sorted(sources) + sorted(headers)
    directory = build_directory(name, files, cflags, ldflags, root)
    if (directory / MARKER).is_file():
        return _import(name, directory), directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildFailed(f"its cache folder {directory} cannot be created ({exc}); "
                          "set FUSED_FT_CACHE to a writable folder") from exc
    import shutil

    if shutil.which(_compiler()) is None:
        raise BuildFailed(f"no C++ compiler ({_compiler()!r}) was found to build it")
    waiting = f"fused_ft: waiting for another process that is building the C++ extension in {directory}"
    with _exclusive(directory / "build.lock", waiting):
        if (directory / MARKER).is_file():  # built while this process waited
            return _import(name, directory), directory
        stale = directory / "lock"  # torch's FileBaton of a killed build (older torch): nobody else is inside
        if stale.exists():
            stale.unlink()
        print(f"fused_ft: building the C++ extension {name} for torch {torch.__version__} just in time (once, "
              f"minutes on a small machine); it is cached in {directory}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            with _ninja_on_path(), _quiet_torch():
                from torch.utils import cpp_extension

                module = cpp_extension.load(  # copies of the flag lists: load appends torch's own to them
                    name, [str(s) for s in sources], extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                    extra_include_paths=sorted({str(h.parent) for h in files}), build_directory=str(directory),
                    verbose=False)
        except Exception as exc:  # compiler, linker and ninja errors arrive as several types
            raise _failure(exc, directory) from exc
        seconds = time.perf_counter() - start
        record = {"torch": torch.__version__, "seconds": round(seconds, 1), "cflags": cflags, "ldflags": ldflags,
                  "compiler": _compiler(), "sources": [s.name for s in files]}
        partial = directory / f"{MARKER}.{os.getpid()}"
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, directory / MARKER)  # atomic: a reader sees no marker or a whole one
        print(f"fused_ft: built {name} in {seconds:.1f} s", file=sys.stderr, flush=True)
        return module, directory
