"""pytest-benchmark suite, GPU side: the same ids and groups as test_bench_cpu.py, on CUDA (skipped without).

Providers: ``fused_ft-triton`` against ``torch-fused`` and ``torch-foreach`` (SGD, AdamW) or ``timm``
(LARS, LAMB), ViT-B/16 parameter list. A round is STEPS back-to-back steps ended by a synchronize,
so the GPU never waits for the host between steps, as in a training loop; pytest-benchmark's time is
that round's wall time, and ``extra_info["cuda_ms_per_step"]`` the same steps between two CUDA events.
Run with ``make bench`` on a machine with a GPU; ``python -m benchmarks.gpu_check`` puts the same
providers side by side with the copy bandwidth and the targets.
"""
import pytest
import torch

from benchmarks.providers import make_setup, providers_for, vit_b16_shapes
from fused_ft.testing.specs import UPDATES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU benchmarks need a CUDA device")

STEPS = 20
CASES = [(u, p) for u in UPDATES for p in providers_for(u, "cuda")]


@pytest.fixture(scope="module")
def shapes():
    return vit_b16_shapes()


@pytest.mark.parametrize("update,provider", CASES, ids=[f"{u}-{p}" for u, p in CASES])
def test_step(benchmark, shapes, update, provider):
    setup = make_setup(provider, update, shapes, device="cuda")
    benchmark.group = update
    benchmark.extra_info["provider"] = provider

    def steps():
        for _ in range(STEPS):
            setup.step()
        torch.cuda.synchronize()

    steps()  # warm: compiled kernels, cached tables
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    steps()
    end.record()
    torch.cuda.synchronize()
    benchmark.extra_info["cuda_ms_per_step"] = start.elapsed_time(end) / STEPS
    benchmark.extra_info["steps_per_round"] = STEPS
    benchmark.pedantic(steps, rounds=5, warmup_rounds=1, iterations=1)
