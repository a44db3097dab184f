"""The Triton kernels as a GPU would run them, judged from the compiled sm_90 code (no GPU needed).

``python -m benchmarks.triton_report --check`` captures one fp32 and one bf16 launch of every
kernel with the CUDA launch configuration, compiles them with ``triton.compile`` for sm_90 and reads
registers and spills (``cuobjdump``) and the full-block path's access widths (the LLVM IR's inline
PTX). Catches: a kernel whose full-block path loses its vector loads or stores (a mask on every
access, a missing alignment hint), a kernel that grows past 64 registers or spills (or converts
layouts through shared memory), a kernel the launcher no longer launches. Speed itself is measured
by benchmarks, not here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import triton_report
from fused_ft.kernels import triton_kernels

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {name for name in dir(triton_kernels) if name.endswith("_kernel")}
NO_ELEMENT_STREAMS = {"tensor_sums_kernel"}  # reads per-block sums only, with masked vector loads
PARAM_WRITERS = {"sgd_kernel", "adamw_kernel", "lamb_apply_kernel"}


@pytest.fixture(scope="module")
def compiled():
    if triton_report.tools() is None:
        pytest.skip("the triton wheel ships no ptxas/cuobjdump and none is on PATH: cannot compile for sm_90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile real kernels
    result = subprocess.run([sys.executable, "-m", "benchmarks.triton_report", "--check"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90_in_fp32_and_bf16(compiled):
    """bf16 with each bf16_update: nearest, stochastic rounding (ROUNDING=1), kahan (ROUNDING=2)."""
    assert {r["kernel"] for r in compiled} == KERNELS
    for kernel in KERNELS - NO_ELEMENT_STREAMS:
        variants = [r["variant"] for r in compiled if r["kernel"] == kernel]
        assert any("fp32" in v for v in variants) and any("bf16" in v for v in variants), (kernel, variants)
    for kernel in PARAM_WRITERS:
        rounding = {v.split("ROUNDING=")[1][0] for v in (r["variant"] for r in compiled if r["kernel"] == kernel)}
        assert rounding == {"0", "1", "2"}, (kernel, rounding)


def test_at_most_64_registers_and_no_spills(compiled):
    for r in compiled:
        assert r["spilled_bytes"] == 0, r
        assert r["registers"] <= triton_report.MAX_REGISTERS, r


def test_full_block_path_moves_element_streams_in_128_bit_accesses(compiled):
    """128 bits a thread for every stream; 64 for a 16-bit stream where the kernel also stores fp32
    state (the launcher runs those at 4 elements a thread to avoid a shared-memory layout conversion)."""
    for r in compiled:
        if r["kernel"] in NO_ELEMENT_STREAMS:
            continue
        streams = r["streams"]
        assert any(name.startswith("ld ") for name in streams), r
        assert streams == r["expected"], r
        state = {name: bits for name, bits in streams.items() if name.split()[1] in triton_report.STATE_STREAMS}
        assert all(bits == 128 for bits in state.values()), r
        if "fp32" in r["variant"].split()[0]:
            assert all(bits == 128 for bits in streams.values()), r
        if r["kernel"] in PARAM_WRITERS:
            assert "st param" in streams, r
