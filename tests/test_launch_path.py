"""Every Triton launch a CUDA step makes, through Triton's own launch path, without a GPU.

The Triton interpreter proves the kernels' math but not their launch: it does not run the binder that
Triton generates from a kernel's signature, nor the specialization, compile and argument packing. On
the first real GPU run every launch failed there (a kernel argument named ``params``, shadowed by a
local of the binder), while every test on the interpreter passed. ``tests/launch_path.py`` drives
every family of launches (registry x dtypes x bf16 modes with frozen and no-decay groups, odd and
viewed tensors, gradients in other dtypes, mixed-dtype groups, step_in_backward's single-parameter
launches, the memory profiler's measured step) through ``JITFunction.run`` under a stand-in driver
(``tests/stand_in_gpu.py``) for sm_90 and sm_80, compiling every variant; only the launch itself is
stubbed. Catches: a kernel argument the binder shadows, an argument that does not specialize or pack
(a dict, a tensor where a scalar goes, an int past int32), a variant that does not compile for
one arch, a kernel that needs scratch memory without an allocator or more shared memory or threads
than the GPU has, a launch that bypasses the path, and a launch family or constexpr value the
runner no longer reaches.
"""
import inspect
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from fused_ft.kernels import triton_kernels

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.triton

DTYPES = {"fp32", "fp16", "bf16"}
BOOL = {"True", "False"}
# Every constexpr of every kernel, and the values a CUDA step must compile it with: the runner reaches
# each one (a constexpr added to a kernel without a row here fails the test).
CONSTEXPRS = {
    "sgd_kernel": dict(P_DTYPE=DTYPES, G_DTYPE=DTYPES, HAS_MOMENTUM=BOOL, NESTEROV=BOOL, ADAPT=BOOL, TRUST_CLIP=BOOL,
                       ROUNDING={"0", "1", "2"}, BLOCK={"1024"}),
    "adamw_kernel": dict(P_DTYPE=DTYPES, G_DTYPE=DTYPES, AMSGRAD=BOOL, ROUNDING={"0", "1", "2"}, BLOCK={"1024"}),
    "block_sumsq_kernel": dict(A_DTYPE=DTYPES, B_DTYPE=DTYPES, TWO={"True"}, A_KAHAN=BOOL, BLOCK={"1024"}),
    "tensor_sums_kernel": dict(TWO={"True"}, RBLOCK={"1024"}),
    "clip_kernel": dict(G_DTYPE=DTYPES, ACCUMULATE=BOOL, BLOCK={"1024"}, CHUNK={"32"}, RBLOCK={"1024"}),
    "lamb_moments_kernel": dict(P_DTYPE=DTYPES, G_DTYPE=DTYPES, HAS_CLIP=BOOL, AVERAGING=BOOL, ADAPT=BOOL,
                                ROUNDING={"0", "2"}, BLOCK={"1024"}),
    "lamb_apply_kernel": dict(P_DTYPE=DTYPES, ADAPT=BOOL, TRUST_CLIP=BOOL, ROUNDING={"0", "1", "2"}, BLOCK={"1024"}),
}
# every bf16_update mode of every kernel that stores bf16 parameters
ROUNDING_OF_BF16 = {name: {"0", "1", "2"} for name in ("sgd_kernel", "adamw_kernel", "lamb_apply_kernel")}
FAMILIES = ("registry", "grad_dtypes", "mixed_dtypes", "step_in_backward", "loop_scalars", "memory_profile")


def _kernels() -> dict:
    return {name: getattr(triton_kernels, name) for name in dir(triton_kernels) if name.endswith("_kernel")}


def _constexprs(kernel) -> list[str]:
    fn = getattr(kernel, "fn", kernel)
    return [n for n, p in inspect.signature(fn).parameters.items() if p.annotation in ("tl.constexpr",)
            or getattr(p.annotation, "__name__", "") == "constexpr"]


def _run(arch: int, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a cold compile of every variant, every run
    out = tmp_path / "launches.json"
    result = subprocess.run([sys.executable, "-m", "tests.launch_path", "--arch", str(arch), "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", [90, 80])
def test_every_launch_goes_through_tritons_launch_path(arch, tmp_path):
    report = _run(arch, tmp_path)
    errors = "\n\n".join(f"[{family}]\n{text}" for family, text in report["errors"].items())
    assert not report["errors"], f"launches that fail on a GPU (sm_{arch}):\n{errors}"
    launches = report["launches"]
    by_family = defaultdict(int)
    for launch in launches:
        by_family[launch["family"]] += 1
        assert launch["arch"] == arch  # the compiled kernel's target
    # every launch fused_ft counted reached the (stand-in) GPU through Triton's path, in every family
    assert dict(by_family) == report["counted"]
    assert all(by_family[f] > 0 for f in FAMILIES), dict(by_family)

    seen = defaultdict(lambda: defaultdict(set))
    bf16_rounding = defaultdict(set)
    for launch in launches:
        for name, value in launch["constants"].items():
            seen[launch["kernel"]][name].add(value)
        if launch["constants"].get("P_DTYPE") == "bf16":
            bf16_rounding[launch["kernel"]].add(launch["constants"]["ROUNDING"])
    kernels = _kernels()
    assert set(seen) == set(kernels) == set(CONSTEXPRS)
    for name, kernel in kernels.items():
        assert set(CONSTEXPRS[name]) == set(_constexprs(kernel)), f"{name}: update CONSTEXPRS for its constexprs"
        for constexpr, values in CONSTEXPRS[name].items():
            assert seen[name][constexpr] == values, (name, constexpr)
    for name, modes in ROUNDING_OF_BF16.items():
        assert bf16_rounding[name] == modes, name
    # step_in_backward's buckets: the whole small model in one (fp32), one parameter each (bf16)
    updates = [launch for launch in launches if launch["family"] == "step_in_backward"
               and launch["kernel"] in ("sgd_kernel", "adamw_kernel", "lamb_moments_kernel", "lamb_apply_kernel")]
    assert {launch["tensors"] for launch in updates if launch["constants"]["P_DTYPE"] == "bf16"} == {1}
    assert {launch["tensors"] for launch in updates if launch["constants"]["P_DTYPE"] == "fp32"} == {4}
    assert any(launch["tensors"] > 1 for launch in launches if launch["family"] == "registry")
    # the loop's device scalars reach the kernels as pointers, in every dtype: GradScaler's (both, and found_inf
    # alone after unscale_), AdamW's capturable step counts (an address table) and a tensor lr
    device_args = defaultdict(set)
    for launch in launches:
        if launch["family"] == "loop_scalars":
            sig = launch["signature"]
            pointers = tuple(name for name in ("grad_scale", "found_inf", "step_ptrs", "lr_ptr", "b_scale", "step_ptr")
                             if sig.get(name, "constexpr") != "constexpr")
            constants = launch["constants"]
            device_args[launch["kernel"], constants.get("P_DTYPE", constants.get("A_DTYPE"))].add(pointers)
    # the capturable bias corrections are computed from fp64 arguments: the interpreter passes every float as a
    # double, so only the compiled signature shows an fp32 one (whose lr moved the fp32 step size in ~0.5% of steps)
    assert {(launch["signature"][n]) for launch in launches if launch["kernel"] == "adamw_kernel"
            for n in ("lr", "weight_decay", "log2_beta1", "log2_beta2")} == {"fp64"}
    assert {(launch["signature"][n]) for launch in launches if launch["kernel"].startswith("lamb_")
            for n in ("log2_beta1", "log2_beta2")} == {"fp64"}
    for dtype in DTYPES:  # (sgd_kernel: SGD's and LARS's)
        assert device_args["sgd_kernel", dtype] == {("grad_scale", "found_inf"), ("found_inf",), ()}, dtype
        assert device_args["block_sumsq_kernel", dtype] == {("b_scale",), ()}, dtype  # LARS's gradient norms
        # LAMB capturable: its group step, GradScaler's in the moments (the clip's norm, the gradients) and apply
        assert device_args["lamb_moments_kernel", dtype] == {("grad_scale", "found_inf", "step_ptr"),
                                                             ("found_inf", "step_ptr"), ("step_ptr",)}, dtype
        assert device_args["lamb_apply_kernel", dtype] == {("found_inf", "step_ptr"), ("step_ptr",)}, dtype
        assert device_args["adamw_kernel", dtype] == {
            ("grad_scale", "found_inf", "step_ptrs"), ("found_inf", "step_ptrs"), ("step_ptrs",),
            ("grad_scale", "found_inf", "step_ptrs", "lr_ptr"), ("found_inf", "step_ptrs", "lr_ptr"),
            ("step_ptrs", "lr_ptr")}, dtype


def _binder_names() -> set[str]:
    """The names Triton's generated binder binds itself: its locals and the globals it reads.

    Built from a one-argument kernel's binder (``create_function_from_signature``, Triton's code that
    ``JITFunction.create_binder`` runs for every kernel), so a new Triton's names are found, not listed.
    """
    from triton.runtime.jit import JITFunction, create_function_from_signature

    def probe(x):
        pass

    class AnyBackend:  # the binder only stores what it takes from the backend (Triton 3.2: compute_spec_key)
        def __getattr__(self, name):
            return None

    jitted = JITFunction(probe)
    binder = create_function_from_signature(jitted.signature, jitted.params, AnyBackend())
    code = binder.__code__
    own = set(code.co_varnames) | set(code.co_names) | set(binder.__globals__) - {"__builtins__"}
    return own - {"x"}, code


def test_no_kernel_argument_takes_a_name_of_tritons_binder():
    reserved, code = _binder_names()
    # the probe sees the binder: its **keyword parameter ('options' in Triton 3.8, 'excess_kwargs' in 3.2)
    assert code.co_flags & inspect.CO_VARKEYWORDS and code.co_varnames[code.co_argcount] in reserved
    if "params" in code.co_varnames:  # Triton 3.6-3.8: the local that shadowed the kernels' 'params'
        assert {"params", "specialization", "options"} <= reserved, sorted(reserved)
    jitted = [v for v in vars(triton_kernels).values() if hasattr(v, "fn") and callable(v.fn)]
    assert len(jitted) >= len(_kernels())
    for kernel in jitted:
        clash = set(inspect.signature(kernel.fn).parameters) & reserved
        assert not clash, (f"{kernel.fn.__name__} takes {sorted(clash)}, which Triton's generated binder uses "
                           "itself: every launch would fail before it runs; name it for what it holds (*_ptrs)")
