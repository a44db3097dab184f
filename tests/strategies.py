"""Hypothesis strategies for tensor lists with the shapes that break kernels: 0-dim, empty, odd, strided,
and all-zero gradients next to non-zero weights (LARS/LAMB's zero-norm guards)."""
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
    """A list of (shape, transpose, zero_grad) specs; ``transpose`` makes a non-contiguous 2-d view,
    ``zero_grad`` gives the tensor all-zero gradients (see ``grads_like``)."""
    specs = draw(st.lists(st.tuples(SHAPES, st.booleans(), st.booleans()), min_size=1, max_size=max_tensors))
    return [(shape, transpose and len(shape) == 2 and shape[0] > 1 and shape[1] > 1, zero)
            for shape, transpose, zero in specs]


def build(specs, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Leaf tensors for ``specs`` (non-contiguous where asked), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, transpose, _ in specs:
        if transpose:
            t = torch.randn(shape[1], shape[0], generator=g, dtype=dtype).t()
        else:
            t = torch.randn(shape, generator=g, dtype=dtype)
        out.append(t.requires_grad_())
    return out


def grads_like(params, seed: int, specs=None) -> list[torch.Tensor]:
    """Random gradients shaped like ``params``; zeros where ``specs`` asks for them."""
    g = torch.Generator().manual_seed(seed)
    zero = [spec[2] for spec in specs] if specs is not None else [False] * len(params)
    return [torch.zeros(p.shape, dtype=p.dtype) if z else torch.randn(p.shape, generator=g, dtype=p.dtype)
            for p, z in zip(params, zero)]
