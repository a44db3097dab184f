"""Hypothesis strategies for tensor lists with the shapes that break kernels: 0-dim, empty, odd, strided."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

SHAPES = st.one_of(
    st.just(()),
    st.just((0,)),
    st.tuples(st.integers(1, 70)),
    st.tuples(st.integers(1, 9), st.integers(1, 9)),
    st.tuples(st.integers(1, 3), st.integers(0, 4), st.integers(1, 5)),
)


@st.composite
def tensor_lists(draw, max_tensors: int = 8):
    """A list of (shape, transpose) specs; ``transpose`` makes a non-contiguous 2-d view."""
    specs = draw(st.lists(st.tuples(SHAPES, st.booleans()), min_size=1, max_size=max_tensors))
    return [(shape, transpose and len(shape) == 2 and shape[0] > 1 and shape[1] > 1) for shape, transpose in specs]


def build(specs, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Leaf tensors for ``specs`` (non-contiguous where asked), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, transpose in specs:
        if transpose:
            t = torch.randn(shape[1], shape[0], generator=g, dtype=dtype).t()
        else:
            t = torch.randn(shape, generator=g, dtype=dtype)
        out.append(t.requires_grad_())
    return out


def grads_like(params, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
