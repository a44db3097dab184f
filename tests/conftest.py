import os

import pytest
import torch

# The Triton tests run the kernels on CPU tensors, in Triton's CPU interpreter, on every machine: a
# GPU machine too (the kernels on CUDA are benchmarks/gpu_check.py's job). The flag is read when
# @triton.jit decorates the kernels, so it must be set before fused_ft imports them.
os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings


def _cache_interpreter_lang_patching() -> None:
    """Triton's interpreter re-patches triton.language on every call of a @triton.jit helper (tl.sum is
    one, called once per program), scanning each module with inspect.getmembers: about a third of
    the interpreter tests' time. The builtins it finds never change, so list them once; the patching
    itself (and its undoing) stays Triton's."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if not hasattr(interpreter, "_patch_builtin") or not hasattr(interpreter, "_patch_attr"):
        return  # another Triton: leave it alone
    builtins: dict[int, list] = {}

    def patch_builtin(pkg, builder, *scope):  # Triton 3.1 (torch 2.5's) passes no scope, later ones one
        members = builtins.get(id(pkg))
        if members is None:  # first call: top level, nothing patched yet
            members = builtins[id(pkg)] = [(n, m) for n, m in inspect.getmembers(pkg) if tl.core.is_builtin(m)]
        for name, member in members:
            interpreter._patch_attr(pkg, name, member, builder, *scope)

    interpreter._patch_builtin = patch_builtin


if os.environ.get("TRITON_INTERPRET") == "1":
    _cache_interpreter_lang_patching()

def pytest_collection_modifyitems(config, items):
    """Below fused_ft's Triton floor (torch 2.5's Triton 3.1, in make compat) backend='triton' is refused,
    which test_kernels checks with a patched version: the tests that run the triton backend (named so, in a
    file named so, or marked ``triton``) are skipped there, saying why, rather than failing on the refusal."""
    try:
        from fused_ft.kernels.triton_launch import below_floor_reason
    except ImportError:
        return
    reason = below_floor_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "triton" in item.nodeid.lower() or item.get_closest_marker("triton"):
            item.add_marker(skip)


settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# pytest-xdist runs one worker per core: more torch threads than cores makes OpenMP spin-wait
# and slows the suite by an order of magnitude on a 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A tiny ImageFolder: 2 classes (dark / bright squares), train/id_val/id_test and two OOD splits."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    g = torch.Generator().manual_seed(0)
    for split, n in [("train", 24), ("id_val", 8), ("id_test", 8), ("ood_test", 8), ("ood_test_b", 6)]:
        for label, level in [("dark", 60), ("bright", 190)]:
            (root / split / label).mkdir(parents=True)
            for i in range(n // 2):
                pixels = (level + 40 * torch.randn(40, 40, 3, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.png")
    return root
