"""What the Triton kernels compile to on sm_80 and sm_90, without a GPU: ``python -m benchmarks.triton_report``.

1. Capture (a child process under ``TRITON_INTERPRET=1`` and ``FUSED_FT_TRITON_TARGET=cuda``, every
   launch stubbed): the exact variants the launcher produces on CUDA - kernel, constexprs, Triton's
   argument specialization, num_warps - for every update and option set of the registry
   (``fused_ft.testing.specs.OPTIMIZERS``) x parameter dtype (fp32, bf16, fp16; gradients take the
   parameter's dtype, as torch's grad setter demands) on the ViT-B/16 list, and the five updates of
   ``UPDATES`` on the ViT-L/14 list, whose variants must add nothing new.
2. Compile (this process, no interpreter): each variant with ``triton.compile`` for sm_80 and sm_90.
   Registers and spilled bytes come from ``cuobjdump --dump-resource-usage`` on the cubin; the
   vector width of every element stream of the full-block path from the LLVM IR (each global access
   is inline PTX carrying the source line it came from: a stream's line has unmasked accesses on
   the full-block path and masked ones on the tail path); theoretical occupancy from registers,
   warps and shared memory.
3. Predict a step on H100 SXM and H200: bytes at the measured STREAM-triad bandwidth (2.97 and
   4.15 TB/s), plus launches x 6 us, plus the host time measured by ``benchmarks.host_overhead``;
   beside torch ``fused=True`` at the same bandwidth, its launch count (multi_tensor_apply's rules)
   and its host time with its kernels stubbed (on a GPU the host only launches them).

``--check`` compiles one fp32 and one bf16 variant of each kernel for sm_90 and prints JSON (the CI
test's evidence, ``tests/test_triton_compile.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = (80, 90)
# Per SM: registers, threads, resident blocks, shared memory (bytes) usable by blocks.
SM_LIMITS = {80: (65536, 2048, 32, 164 * 1024), 90: (65536, 2048, 32, 228 * 1024)}
BANDWIDTH = {"H100 SXM": 2.97e12, "H200": 4.15e12}  # bytes/s, measured STREAM triads
LAUNCH_SECONDS = 6e-6
MAX_REGISTERS = 64
PARAM_DTYPES = ("float32", "bfloat16", "float16")
LISTS = {"ViT-B/16": "vit_base_patch16_224", "ViT-L/14": "vit_large_patch14_clip_224"}


# -- 1. capture (child process) ---------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    return value


def _specialize(fn, kwargs: dict, num_warps: int) -> dict:
    """The JIT's view of one launch: per parameter its signature type, specialization and constexpr value."""
    import inspect

    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    dont = set(getattr(fn, "kwargs", {}).get("do_not_specialize") or ())
    args = []
    for name, param in inspect.signature(fn.fn).parameters.items():
        value = kwargs[name]
        if param.annotation in (tl.constexpr, "tl.constexpr"):
            args.append([name, "constexpr", None, _json_value(value)])
            continue
        kind, attr = native_specialize_impl(CUDABackend, value, False, name not in dont, True)
        args.append([name, kind, attr, value if kind == "constexpr" else None])
    return {"kernel": fn.fn.__name__, "num_warps": num_warps, "args": args}


def capture() -> dict:
    """Run in a child process (see the module doc). Returns variants and launches per step."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FUSED_FT_TRITON_TARGET") == "cuda"
    import torch

    from benchmarks.providers import vit_shapes
    from fused_ft.kernels import triton_launch as TL
    from fused_ft.testing.specs import OPTIMIZERS, UPDATES

    variants: dict[str, dict] = {}
    launched: list[str] = []

    def record(kernel, grid, kwargs, num_warps):
        v = _specialize(kernel, kwargs, num_warps)
        key = json.dumps(v, sort_keys=True)
        variants.setdefault(key, {**v, "key": key, "labels": []})["labels"].append(label)
        launched.append(key)

    TL._execute = record
    launches: dict[str, dict[str, list[str]]] = {}  # list -> update -> the steady step's variant keys
    for list_name, model in LISTS.items():
        shapes = vit_shapes(model)
        cases = [(u.optimizer, name, dict(u.kwargs)) for name, u in UPDATES.items()]
        if list_name == "ViT-B/16":
            cases += [(s.name, f"{s.name}:{v}", dict(kw)) for s in OPTIMIZERS.values() for v, kw in s.variants.items()]
            cases += LOOP_SCALAR_CASES
        for optimizer, case, kwargs in cases:
            for dtype_name in PARAM_DTYPES if list_name == "ViT-B/16" else ("float32",):
                dtype = getattr(torch, dtype_name)
                label = f"{list_name} {case} {dtype_name}"
                params = [torch.empty(s, dtype=dtype) for s in shapes]  # never touched: launches are stubbed
                for p in params:
                    p.grad = torch.empty_like(p)
                scaled = kwargs.get("scaler", False)
                opt = OPTIMIZERS[optimizer].cls(params, **{k: v for k, v in kwargs.items() if k != "scaler"},
                                                backend="triton")
                if scaled:  # what GradScaler.step sets before it calls step()
                    opt.grad_scale, opt.found_inf = torch.ones(1), torch.zeros(1)
                opt.step()  # creates state (first-step momentum)
                launched.clear()
                opt.step()  # the steady state
                if case in UPDATES and dtype_name == "float32":
                    launches.setdefault(list_name, {})[case] = list(launched)
                del opt, params
    return {"variants": list(variants.values()), "launches": launches}


def capture_in_child(what: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "FUSED_FT_TRITON_TARGET": "cuda"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "capture.json"
        subprocess.run([sys.executable, "-m", "benchmarks.triton_report", f"--{what}", str(out)], env=env,
                       check=True, cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.read_text())


# -- 2. compile and inspect ---------------------------------------------------------------------
@dataclass
class Inspection:
    kernel: str
    arch: int
    num_warps: int
    block: int | None
    registers: int
    spilled_bytes: int
    shared_bytes: int
    streams: dict[str, int]  # "ld p" -> bits of the full-block path's accesses (min over instructions)
    occupancy: float
    bytes_per_element: float | None

    expected: dict[str, int]  # the widths the launch configuration is chosen for (expected_bits)

    @property
    def ok(self) -> bool:
        return self.registers <= MAX_REGISTERS and self.spilled_bytes == 0 and self.streams == self.expected


STATE_STREAMS = ("buf", "m", "v", "vmax")  # fp32 optimizer state
STREAM_DTYPE = {"p": "P_DTYPE", "param": "P_DTYPE", "g": "G_DTYPE", "a": "A_DTYPE", "b": "B_DTYPE"}
INT16_STREAMS = ("comp",)  # kahan's compensation of bf16 weights


def expected_bits(variant: dict, streams: dict[str, int]) -> dict[str, int]:
    """128 bits for every stream, except 64 for a 16-bit stream in a kernel that stores fp32 state
    (the launcher runs those at 4 elements a thread: see triton_launch._CUDA_WARPS_MIXED)."""
    constexprs = {name: value for name, kind, _, value in variant["args"] if kind == "constexpr"}
    stores_state = any(k.split()[0] == "st" and k.split()[1] in STATE_STREAMS for k in streams)
    expected = {}
    for stream in streams:
        dtype = constexprs.get(STREAM_DTYPE.get(stream.split()[1], ""))
        sixteen_bit = (isinstance(dtype, dict) and dtype["dtype"] in ("bf16", "fp16")
                       or stream.split()[1] in INT16_STREAMS)
        expected[stream] = 64 if sixteen_bit and stores_state else 128
    return expected


def tools() -> tuple[str, str] | None:
    """The ptxas and cuobjdump that ship with the triton wheel (None when it has none)."""
    import triton

    nvidia_bin = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas, cuobjdump = nvidia_bin / "ptxas", nvidia_bin / "cuobjdump"
    if not (ptxas.exists() and cuobjdump.exists()):
        ptxas, cuobjdump = shutil.which("ptxas"), shutil.which("cuobjdump")
        if not (ptxas and cuobjdump):
            return None
    return str(ptxas), str(cuobjdump)


_ASM = re.compile(r'asm sideeffect "([^"]*)".*!dbg !(\d+)')
_ACCESS = re.compile(r"(@\$\d+\s+)?(ld|st)\.global((?:\.[a-z0-9]+)*)\s")
_LOCATION = re.compile(r"^!(\d+) = !DILocation\(line: (\d+)")
_POINTER = re.compile(r"tl\.(load|store)\((\w+)")


def _accesses(llir: str) -> dict[tuple[int, str], list[tuple[bool, int]]]:
    """Global loads and stores by (source line, ld/st): (masked?, bits) for each.

    Read from the LLVM IR, where Triton emits every global access as inline PTX carrying its own
    source location (the PTX's .loc lines drift across LLVM's scheduling); a masked access is
    predicated (``@$n``).
    """
    lines = llir.splitlines()
    where = {m.group(1): int(m.group(2)) for m in map(_LOCATION.match, lines) if m}
    found: dict[tuple[int, str], list[tuple[bool, int]]] = {}
    for text in lines:
        asm = _ASM.search(text)
        if asm is None:
            continue
        for m in _ACCESS.finditer(asm.group(1)):
            modifiers = m.group(3).split(".")[1:]
            vector = next((int(x[1:]) for x in modifiers if re.fullmatch(r"v\d", x)), 1)
            bits = next((int(x[1:]) for x in modifiers if re.fullmatch(r"[bfsu]\d+", x)), 0)
            found.setdefault((where[asm.group(2)], m.group(2)), []).append((bool(m.group(1)), vector * bits))
    return found


def element_streams(llir: str, source: list[str]) -> tuple[dict[str, int], int]:
    """Element streams of the full-block path with their narrowest access in bits, and the bytes one
    thread moves through them there.

    A global access carries its source line. A line of the kernels file whose accesses
    are both unmasked (full-block path) and masked (tail path) is an element stream; its unmasked
    accesses are what the full-block path issues. Address-table reads (unmasked only) and one-thread
    stores of sums (masked only) are not streams.
    """
    streams, moved = {}, 0
    for (line, op), accesses in sorted(_accesses(llir).items()):
        full = [bits for masked, bits in accesses if not masked]
        if full and len(full) < len(accesses):
            pointer = _POINTER.search(source[line - 1])
            name = pointer.group(2).removesuffix("_ptr") if pointer else f"line {line}"
            streams[f"{op} {'param' if name == 'ptr' else name}"] = min(full)
            moved += sum(full) // 8
    return streams, moved


def occupancy(arch: int, registers: int, num_warps: int, shared: int) -> float:
    regs, threads, blocks, smem = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256  # allocated in units of 256 registers a warp
    by_regs = regs // (per_warp * num_warps)
    by_threads = threads // (32 * num_warps)
    by_smem = smem // (shared + 1024) if shared else blocks  # 1 KiB a block is reserved
    return min(by_regs, by_threads, blocks, by_smem) * num_warps / (threads // 32)


def compile_variant(variant: dict, arch: int) -> Inspection:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from fused_ft.kernels import triton_kernels

    fn = getattr(triton_kernels, variant["kernel"])
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, kind, attr, value) in enumerate(variant["args"]):
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = tl.dtype(value["dtype"]) if isinstance(value, dict) else value
        elif attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": variant["num_warps"]})
    _, cuobjdump = tools()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spilled = int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1))
    streams, per_thread = element_streams(compiled.asm["llir"], Path(triton_kernels.__file__).read_text().splitlines())
    block = constexprs.get("BLOCK")
    elements_per_thread = block / (32 * variant["num_warps"]) if block else None
    shared = int(compiled.metadata.shared)
    return Inspection(
        kernel=variant["kernel"], arch=arch, num_warps=variant["num_warps"], block=block, registers=registers,
        spilled_bytes=spilled, shared_bytes=shared, streams=streams, expected=expected_bits(variant, streams),
        occupancy=occupancy(arch, registers, variant["num_warps"], shared),
        bytes_per_element=per_thread / elements_per_thread if elements_per_thread and per_thread else None,
    )


def _compile_job(job: tuple[dict, int]) -> Inspection:
    return compile_variant(*job)


def compile_all(variants: list[dict], archs=ARCHS, workers: int = 2) -> list[tuple[dict, Inspection]]:
    jobs = [(v, arch) for v in variants for arch in archs]
    with ProcessPoolExecutor(workers) as pool:
        return list(zip((v for v, _ in jobs), pool.map(_compile_job, jobs)))


# -- 3. the report ------------------------------------------------------------------------------
# The training loop's device scalars (GradScaler's, AdamW's capturable step counts and tensor lr): the kernels
# read each through a pointer, None where absent (then a constexpr)
LOOP_SCALAR_CASES = [
    ("sgd", "sgd+GradScaler", dict(lr=0.1, momentum=0.9, scaler=True)),
    ("lars", "lars+GradScaler", dict(lr=0.5, momentum=0.9, weight_decay=1e-4, scaler=True)),
    ("adamw", "adamw capturable", dict(lr=1e-3, capturable=True)),
    ("adamw", "adamw fused+GradScaler", dict(lr=1e-3, fused=True, scaler=True)),
    ("lamb", "lamb capturable+GradScaler", dict(lr=1e-3, capturable=True, scaler=True)),
]
LOOP_ARGS = ("grad_scale", "found_inf", "step_ptrs", "lr_ptr", "b_scale", "step_ptr")


def describe(variant: dict) -> str:
    """The variant's constexprs and specializations that differ between variants, compactly (with the loop's
    device scalars it reads, by name)."""
    parts = []
    for name, kind, attr, value in variant["args"]:
        if name in LOOP_ARGS:
            if kind != "constexpr":
                parts.append(name)
            continue
        if kind == "constexpr" and name not in ("BLOCK", "RBLOCK", "CHUNK") and value is not None:
            shown = value["dtype"] if isinstance(value, dict) else value
            parts.append(f"{name}={shown}")
    return " ".join(parts)


def variants_table(results: list[tuple[dict, Inspection]]) -> str:
    lines = ["| kernel | variant | sm | BLOCK/warps | registers | spilled B | occupancy | full-block streams (bits) |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for variant, r in sorted(results, key=lambda x: (x[1].kernel, describe(x[0]), x[1].arch)):
        streams = ", ".join(f"{k} {v}" for k, v in r.streams.items()) or "(block sums only)"
        lines.append(f"| {r.kernel} | {describe(variant)} | {r.arch} | {r.block or '-'}/{r.num_warps} | "
                     f"{r.registers} | {r.spilled_bytes} | {r.occupancy:.0%} | {streams}{'' if r.ok else ' NOT MET'} |")
    return "\n".join(lines)


def torch_fused_launches(numels: list[int], depth: int) -> int:
    """Launches of torch's multi_tensor_apply for one fused step (4 KB-argument limits: at most
    110/64/48/36/30 tensors for depth 1-5 and 320 chunks of 65536 elements a launch)."""
    max_tensors = (110, 64, 48, 36, 30)[depth - 1]
    launches, tensors, blocks = 0, 0, 0
    sizes = [n for n in numels if n]
    for i, n in enumerate(sizes):
        tensors += 1
        chunks = -(-n // 65536)
        for c in range(chunks):
            blocks += 1
            last_chunk = c == chunks - 1
            if (tensors == max_tensors and last_chunk) or blocks == 320 or (i == len(sizes) - 1 and last_chunk):
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1
    return launches


TORCH_DEPTH = {"sgd": 3, "sgd-nomom": 2, "adamw": 4}  # tensor lists per fused launch (p, g, state...)
TORCH_STEP_LAUNCHES = {"adamw": 1}  # its _foreach_add_ on the device step counts (depth 1)


def prediction_table(capture: dict, bytes_per_element: dict[str, float], host: list[dict]) -> str:
    """``bytes_per_element``: by variant key, what a launch moves per element of the list (sm_90 code)."""
    from benchmarks.host_overhead import host_ms
    from benchmarks.providers import vit_shapes
    from fused_ft.testing.specs import UPDATES

    ms = host_ms(host)
    gpus = " | ".join(f"{gpu} ms" for gpu in BANDWIDTH)
    lines = [f"| list | update | provider | launches | GB moved | host ms | {gpus} |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(BANDWIDTH)]
    for list_name, model in LISTS.items():
        numels = [s.numel() for s in vit_shapes(model)]
        numel = sum(numels)
        for update, u in UPDATES.items():
            kernels = capture["launches"][list_name][update]
            design = sum(bytes_per_element.get(k) or 0 for k in kernels) * numel
            minimum = u.min_bytes_per_param * numel
            rows = [("fused_ft-triton (min bytes)", len(kernels), minimum, ms(list_name, update, "fused_ft-triton")),
                    ("fused_ft-triton (its bytes)", len(kernels), design, ms(list_name, update, "fused_ft-triton"))]
            if update in TORCH_DEPTH:
                torch_launches = torch_fused_launches(numels, TORCH_DEPTH[update])
                torch_launches += TORCH_STEP_LAUNCHES.get(update, 0) * -(-len(numels) // 110)
                rows.append(("torch fused=True", torch_launches, minimum, ms(list_name, update, "torch-fused-stubbed")))
            for provider, launches, moved, host_time in rows:
                times = " | ".join(f"{(moved / bw + launches * LAUNCH_SECONDS) * 1e3 + host_time:.2f}"
                                   for bw in BANDWIDTH.values())
                lines.append(f"| {list_name} | {update} | {provider} | {launches} | {moved / 1e9:.2f} | "
                             f"{host_time:.2f} | {times} |")
    return "\n".join(lines)


def check() -> list[dict]:
    """One fp32 and one bf16 variant of each kernel (launched on a small list), compiled for sm_90."""
    results = []
    for v in capture_in_child("capture-small")["variants"]:
        r = compile_variant(v, 90)
        results.append({"kernel": r.kernel, "variant": describe(v), "registers": r.registers,
                        "spilled_bytes": r.spilled_bytes, "streams": r.streams, "expected": r.expected})
    return results


def capture_small() -> dict:
    """One launch of every kernel in fp32 and bf16 on a tiny list: the variants the CI test compiles."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FUSED_FT_TRITON_TARGET") == "cuda"
    import torch

    from fused_ft.kernels import triton_launch as TL
    from fused_ft.testing.specs import OPTIMIZERS, UPDATES

    variants: dict[str, dict] = {}

    def record(kernel, grid, kwargs, num_warps):
        v = _specialize(kernel, kwargs, num_warps)
        variants.setdefault(json.dumps(v, sort_keys=True) if v["kernel"] == "tensor_sums_kernel"
                            else v["kernel"] + dtype_name + mode, v)

    TL._execute = record
    # bf16 weights also with each way of storing them (stochastic rounding, kahan compensation)
    for dtype_name, mode in (("float32", "nearest"), ("bfloat16", "nearest"), ("bfloat16", "stochastic"),
                             ("bfloat16", "kahan")):
        for u in UPDATES.values():
            params = [torch.zeros(s, dtype=getattr(torch, dtype_name)) for s in ((3000,), (64, 33), (7,))]
            for p in params:
                p.grad = torch.zeros_like(p)
            OPTIMIZERS[u.optimizer].cls(params, **u.kwargs, backend="triton", bf16_update=mode).step()
    return {"variants": list(variants.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capture", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--capture-small", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help="compile one variant per kernel and dtype, print JSON")
    args = parser.parse_args(argv)
    if args.capture or args.capture_small:
        host = None
        if args.capture:  # first, before the capture's large lists churn the allocator and caches
            from benchmarks import host_overhead

            host = host_overhead.measure(rounds=7, steps=30)
        data = capture() if args.capture else capture_small()
        data["host"] = host
        Path(args.capture or args.capture_small).write_text(json.dumps(data))
        return 0
    if tools() is None:
        print("the triton wheel ships no ptxas/cuobjdump and none is on PATH: nothing to compile", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(check()))
        return 0
    data = capture_in_child("capture")
    results = compile_all(data["variants"])
    bytes_per_element = {v["key"]: r.bytes_per_element for v, r in results if r.arch == 90}
    new_on_l14 = [v for v in data["variants"] if not any(label.startswith("ViT-B/16") for label in v["labels"])]
    bad = [(v, r) for v, r in results if not r.ok]
    print(f"Command: `python -m benchmarks.triton_report` ({len(data['variants'])} variants x sm_80, sm_90 = "
          f"{len(results)} compiles; ViT-L/14 added {len(new_on_l14)} variants to ViT-B/16's)\n")
    print(variants_table(results))
    print(f"\n{len(results) - len(bad)}/{len(results)} compiles use at most {MAX_REGISTERS} registers, spill "
          "nothing and move every element stream of the full-block path in 128-bit accesses (64-bit for a "
          "16-bit stream in a kernel that also stores fp32 state, by design: triton_launch._CUDA_WARPS_MIXED).")
    for v, r in bad:
        print(f"- NOT MET: {r.kernel} {describe(v)} sm_{r.arch}: {r.registers} registers, {r.spilled_bytes} B spilled, "
              f"streams {r.streams}")
    print("\nPredicted step (bytes / STREAM-triad bandwidth + launches x 6 us + measured host ms):\n")
    print(prediction_table(data, bytes_per_element, data["host"]))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
