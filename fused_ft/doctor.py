"""What fused_ft can use on this machine: ``python -m fused_ft.doctor`` (or ``fused-ft doctor``).

It reports the C++ extension (built ahead of time or just in time, where it lives, the torch it was
compiled against), which implementation runs the host work of a step, Triton, CUDA, the backend that
``backend='auto'`` picks on each device, and the optional extras. It exits with status 1 when the C++
extension is unavailable (its line says why and how to fix it), else 0.
"""
from __future__ import annotations

import importlib.metadata
import os
import sys

__all__ = ["report", "main"]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _extension_lines() -> tuple[list[tuple[str, str]], bool]:
    from fused_ft.kernels import native

    info = native.INFO
    if info.origin is None:
        return [("C++ extension", f"unavailable: {info.error}"),
                ("host helpers", "Python fallback (several times slower per step than the C++ helpers)"),
                ("fix", native.fix(info.error))], False
    built_for = f"for torch {info.torch_version}" if info.torch_version else "(for a torch it does not record)"
    return [("C++ extension", f"available, built {info.origin} {built_for}"),
            ("  path", str(info.path)),
            ("host helpers", "C++ (params_with_grads, flat_addresses, increment_steps, gather_state)")], True


def _triton_line() -> str:
    try:  # the module, not a distribution's metadata: the version the backend checks, whatever the wheel's name
        import triton
    except ImportError:
        return "not installed (backend='triton' unavailable; on Linux it comes with torch)"
    from fused_ft.kernels.triton_launch import below_floor_reason

    version = triton.__version__
    reason = below_floor_reason(version)
    if reason is not None:
        return f"{version}: {reason}"
    interpret = " (TRITON_INTERPRET=1: kernels run in the CPU interpreter)" if os.environ.get(
        "TRITON_INTERPRET") == "1" else ""
    return f"{version}{interpret}"


def _cuda_line() -> str:
    import torch

    if not torch.cuda.is_available():
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch"
        return f"no device ({built})"
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return f"{torch.cuda.device_count()} device(s): {', '.join(names)} (CUDA {torch.version.cuda})"


def _backend_lines() -> list[tuple[str, str]]:
    import torch

    from fused_ft import available_backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = []
    for device in devices:
        names = available_backends(device)
        lines.append((f"backends on {device}", f"auto -> {names[0]}; available: {', '.join(names)}"))
    return lines


def _extras_line() -> str:
    parts = []
    for extra, distributions in (("vision", ("timm", "open_clip_torch")), ("plots", ("matplotlib",))):
        found = [f"{d} {_version(d)}" for d in distributions if _version(d)]
        missing = [d for d in distributions if not _version(d)]
        state = ", ".join(found) if not missing else f"missing {', '.join(missing)} (pip install 'fused_ft[{extra}]')"
        parts.append(f"{extra}: {state}")
    return "; ".join(parts)


def report() -> tuple[list[str], bool]:
    """The report's lines, and whether the C++ extension is available."""
    import torch

    import fused_ft

    extension, ok = _extension_lines()
    rows = [("fused_ft", f"{fused_ft.__version__} ({os.path.dirname(fused_ft.__file__)})"),
            ("torch", f"{torch.__version__}"), *extension, ("Triton", _triton_line()), ("CUDA", _cuda_line()),
            *_backend_lines(), ("extras", _extras_line())]
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {text}" for label, text in rows], ok


def main() -> int:
    lines, ok = report()
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
