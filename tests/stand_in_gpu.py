"""A stand-in CUDA driver for Triton: every launch goes through Triton's own launch path on a machine
without a GPU, and only the final kernel launch is replaced.

``kernel[grid](**kwargs)`` on a GPU runs, in ``triton.runtime.jit.JITFunction.run``: the binder that
Triton generates from the kernel's signature (``create_function_from_signature``: binding, defaults
and ``specialize_impl`` on every argument: dtypes, 16-byte alignment, integer divisibility, None),
the cache key, ``_pack_args`` (constexprs, attributes, ``backend.parse_options``), the compile for the
driver's target (``triton.compile``: TTIR, TTGIR, LLVM IR, PTX, cubin with the wheel's ptxas), then
``CompiledKernel.run``: the launcher built from the compiled kernel's metadata, the shared-memory and
thread limits, a global-scratch allocation where the kernel needs one, and the C launcher that packs
every argument into the kernel's parameter buffer. All of that runs here unchanged. Replaced:

- the driver (``triton.runtime.driver.set_active``): device, stream and target come from this file
  (device 0 is an sm_90 GPU, device 1 an sm_80 one, so the JIT compiles and caches each separately);
- ``utils.load_binary``: returns the limits of an H100/A100 instead of loading the cubin;
- ``launcher_cls``: Triton's C launcher (``backends/nvidia/driver.c``, which needs libcuda) is
  replaced by :class:`PackingLauncher`, which packs the arguments by the same rules (a pointer is
  None, an int or an object whose ``data_ptr()`` is an int; integers must fit their C type; floats
  must convert) from the compiled kernel's signature, and records the launch instead of making it.

Triton internals this relies on (run on Triton 3.8, the dev pin, and 3.2, the triton backend's floor):
``triton.runtime.driver``'s
``set_active`` (and its ``_active``, restored afterwards); the driver methods ``JITFunction.run``/``create_binder`` and
``CompiledKernel._init_handles`` call (``get_current_device``, ``get_current_stream``,
``get_current_target``, ``launcher_cls(src, metadata)``, ``utils.load_binary``,
``utils.get_device_properties``); ``src.signature``/``src.constants`` of the ``ASTSource`` the
launcher is built from; the launcher's call convention (grid, stream, function, packed metadata,
launch metadata, two hooks, then the kernel's arguments).
"""
from __future__ import annotations

import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

# device index -> (compute capability, shared memory per block in bytes, threads per block)
DEVICES = {0: (90, 232448, 1024), 1: (80, 166912, 1024)}

# struct format per scalar type of a kernel signature: what driver.c's extract* functions store
_FORMATS = {"i1": "b", "i8": "b", "i16": "h", "i32": "i", "i64": "q", "u1": "B", "u8": "B", "u16": "H",
            "u32": "I", "u64": "Q", "fp16": "e", "bf16": "f", "fp32": "f", "f32": "f", "fp64": "d"}


@dataclass
class Launch:
    """One launch as the GPU would have received it."""

    kernel: str
    arch: int  # the compiled kernel's target, from its metadata
    grid: tuple[int, int, int]
    num_warps: int
    shared: int
    signature: dict[str, str]
    constants: dict[str, Any]
    packed_bytes: int
    tensors: int | None  # the tensors the launch covers (the size of its ``numels`` table), where it has one


def _loader_takes_max_threads() -> bool:
    """Newer Triton also reads the kernel's thread limit from ``load_binary`` (Triton 3.2 reads 4 values)."""
    import inspect

    from triton.compiler.compiler import CompiledKernel

    return "n_max_threads" in inspect.getsource(CompiledKernel._init_handles)


_LOADER_TAKES_MAX_THREADS = _loader_takes_max_threads()


@dataclass
class _Utils:
    launches: list[Launch] = field(default_factory=list)

    def load_binary(self, name, kernel, shared, device):
        arch, max_shared, max_threads = DEVICES[device]
        handles = (object(), object(), 0, 0)  # module, function, n_regs, n_spills
        return (*handles, max_threads) if _LOADER_TAKES_MAX_THREADS else handles

    def get_device_properties(self, device):
        arch, max_shared, max_threads = DEVICES[device]
        return {"max_shared_mem": max_shared, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def unload_module(self, module):
        pass


def _pointer(value: Any, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    data_ptr = getattr(value, "data_ptr", None)
    if data_ptr is None:
        raise TypeError(f"argument {name}: Pointer argument must be either uint64 or have data_ptr method")
    address = data_ptr()
    if not isinstance(address, int):
        raise TypeError(f"argument {name}: data_ptr method of Pointer object must return 64-bit int")
    return address


class PackingLauncher:
    """Packs a launch's arguments as Triton's C launcher does, then records the launch."""

    def __init__(self, src, metadata):
        self.name = src.fn.__name__
        names = src.fn.arg_names
        self.signature = {(names[k] if isinstance(k, int) else k): v for k, v in src.signature.items()}
        self.constants = {(names[k[0]] if isinstance(k, tuple) else k): v for k, v in src.constants.items()}
        self.metadata = metadata
        self.arg_names = list(names)

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *args):
        size = getattr(self.metadata, "global_scratch_size", 0) or 0  # Triton 3.2 has no scratch memory
        if size:  # as CudaLauncher: a kernel that needs scratch memory asks Triton's allocator
            from triton.runtime import _allocation

            _allocation._allocator.get()(grid_x * grid_y * grid_z * size, self.metadata.global_scratch_align, stream)
        if not all(isinstance(g, int) and 0 < g < 2**31 for g in (grid_x, grid_y, grid_z)):
            raise ValueError(f"{self.name}: invalid grid ({grid_x}, {grid_y}, {grid_z})")
        names = self.arg_names
        if len(args) != len(names):  # older Triton releases pass the non-constexpr arguments only
            names = [n for n in names if self.signature.get(n, "constexpr") != "constexpr"]
        if len(args) != len(names):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(names)} parameters")
        packed = bytearray()
        for name, value in zip(names, args):
            kind = self.signature[name]
            if kind == "constexpr":
                continue
            if kind.startswith("*"):
                packed += struct.pack("Q", _pointer(value, name))
                continue
            try:
                packed += struct.pack(_FORMATS[kind], float(value) if _FORMATS[kind] in "efd" else value)
            except (struct.error, TypeError, ValueError) as exc:
                raise TypeError(f"{self.name}: argument {name}={value!r} does not pack as {kind}: {exc}") from None
        driver = triton.runtime.driver.active
        numels = dict(zip(names, args)).get("numels")
        driver.utils.launches.append(Launch(
            kernel=self.name, arch=self.metadata.target.arch, grid=(grid_x, grid_y, grid_z),
            num_warps=self.metadata.num_warps, shared=self.metadata.shared, signature=dict(self.signature),
            constants={k: str(v) for k, v in self.constants.items()}, packed_bytes=len(packed),
            tensors=None if numels is None else numels.numel(),
        ))


class StandInDriver:
    """Triton's view of a CUDA machine with an sm_90 GPU (device 0) and an sm_80 one (device 1)."""

    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = PackingLauncher
        self.device = 0

    def is_active(self):
        return True

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        self.device = device

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        arch = DEVICES[self.device if device is None else device][0]
        return divmod(arch, 10)

    def get_current_target(self):
        return GPUTarget("cuda", DEVICES[self.device][0], 32)

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    @property
    def launches(self) -> list[Launch]:
        return self.utils.launches


@contextmanager
def stand_in_gpu(device: int = 0):
    """Triton's launches go to a :class:`StandInDriver` (``device``: 0 for sm_90, 1 for sm_80)."""
    driver = StandInDriver()
    driver.device = device
    config = triton.runtime.driver
    previous = getattr(config, "_active", None)  # reset_active() would create the real driver, which needs a GPU
    config.set_active(driver)
    try:
        yield driver
    finally:
        config.set_active(previous)
