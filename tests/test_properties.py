"""Property tests: on any tensor list (0-dim, empty, odd sizes, non-contiguous) fused_ft equals torch/timm."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fused_ft.testing.specs import OPTIMIZERS
from tests.helpers import assert_close_report
from tests.strategies import build, grads_like, tensor_lists


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@given(specs=tensor_lists(), variant_index=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_any_tensor_list_matches_reference(opt_name, specs, variant_index, seed):
    spec = OPTIMIZERS[opt_name]
    kwargs = list(spec.variants.values())[variant_index % len(spec.variants)]
    ours_params = build(specs, seed)
    ref_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours = spec.cls(ours_params, **kwargs, backend="reference")
    ref = spec.reference(ref_params, **kwargs)
    for step in range(3):
        for a, b, g in zip(ours_params, ref_params, grads_like(ours_params, seed + step + 1, specs)):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for i, (a, b) in enumerate(zip(ours_params, ref_params)):
        assert a.stride() == b.stride(), f"param {i}: layout changed"
        assert_close_report(a, b, rtol=spec.reference_rtol, atol=1e-7, what=f"param {i} {tuple(a.shape)}")
