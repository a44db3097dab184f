"""pytest-benchmark suite: one optimizer step per provider and update, ViT-B/16 parameter list (CPU).

Run with ``make bench``. Providers are keyed as in benchmarks/providers.py; ratios between them
come from ``python -m benchmarks.compare``, which interleaves rounds (bandwidth drifts here).
"""
import pytest

from benchmarks.providers import make_setup, providers_for, vit_b16_shapes
from fused_ft.testing.specs import UPDATES

CASES = [(u, p) for u in UPDATES for p in providers_for(u)]


@pytest.fixture(scope="module")
def shapes():
    return vit_b16_shapes()


@pytest.mark.parametrize("update,provider", CASES, ids=[f"{u}-{p}" for u, p in CASES])
def test_step(benchmark, shapes, update, provider):
    setup = make_setup(provider, update, shapes)
    benchmark.group = update
    benchmark.extra_info["provider"] = provider
    benchmark.pedantic(setup.step, rounds=3, warmup_rounds=1, iterations=1)
