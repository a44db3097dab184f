"""Benchmark providers over the registry's updates: who runs each update, keyed as in the results.

``fused_ft-cpu``/``fused_ft-reference`` are fused_ft's backends; ``torch-fused``/``torch-foreach``/
``torch-forloop`` are torch.optim's three implementations (SGD and AdamW); ``timm`` is timm.optim
(LARS and LAMB). Every provider gets its own parameters, gradients and state, built identically.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fused_ft.testing.specs import OPTIMIZERS, UPDATES

TORCH_IMPLS = {"torch-fused": dict(fused=True), "torch-foreach": dict(foreach=True),
               "torch-forloop": dict(foreach=False)}


def vit_shapes(model: str) -> list[torch.Size]:
    """A timm model's parameter shapes, built on the meta device: no memory, no download."""
    import timm

    with torch.device("meta"):
        net = timm.create_model(model, pretrained=False)
    return [p.shape for p in net.parameters()]


def vit_b16_shapes() -> list[torch.Size]:
    """The parameter shapes of ViT-B/16 (86M parameters, 152 tensors)."""
    return vit_shapes("vit_base_patch16_224")


def providers_for(update: str, device: str = "cpu") -> list[str]:
    """Who runs ``update`` in the benchmarks on ``device``: fused_ft's backends there, then torch.optim's
    implementations (SGD, AdamW; on CUDA fused and foreach) or timm (LARS, LAMB)."""
    cuda = device == "cuda"
    names = ["fused_ft-triton"] if cuda else ["fused_ft-cpu", "fused_ft-reference"]
    if UPDATES[update].optimizer in ("sgd", "adamw"):
        return names + (["torch-fused", "torch-foreach"] if cuda else list(TORCH_IMPLS))
    return names + ["timm"]


def build_optimizer(provider: str, update: str, params: list[torch.Tensor], **options) -> torch.optim.Optimizer:
    """``options``: fused_ft-only arguments (``bf16_update``)."""
    u = UPDATES[update]
    spec = OPTIMIZERS[u.optimizer]
    if provider.startswith("fused_ft-"):
        return spec.cls(params, **u.kwargs, backend=provider.removeprefix("fused_ft-"), **options)
    if provider in TORCH_IMPLS:
        return spec.reference(params, **u.kwargs, **TORCH_IMPLS[provider])
    if provider == "timm":
        return spec.reference(params, **u.kwargs)
    raise ValueError(f"Invalid provider: {provider!r}")


@dataclass
class Setup:
    """One provider's parameters with gradients and its optimizer, warmed up (state allocated)."""

    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer

    def step(self) -> None:
        self.optimizer.step()


def make_setup(provider: str, update: str, shapes: list[torch.Size], seed: int = 0,
               dtype: torch.dtype = torch.float32, device: str = "cpu", **options) -> Setup:
    """Parameters and gradients of ``dtype`` on ``device``, the provider's optimizer (``options``: see
    build_optimizer). Values are drawn on the device itself (a CPU draw of ViT-L's 304M takes seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=g, device=device).mul_(0.02).to(dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device).mul_(1e-3).to(dtype)
    setup = Setup(params, build_optimizer(provider, update, params, **options))
    setup.step()  # allocates state; later steps are the steady state
    return setup


def add_sweep(shapes: list[torch.Size]) -> Callable[[], None]:
    """In-place ``a.add_(b)`` over a same-shaped tensor list: the bandwidth yardstick (12 B/element)."""
    a = [torch.ones(s) for s in shapes]
    b = [torch.ones(s) for s in shapes]

    def sweep() -> None:
        for x, y in zip(a, b):
            x.add_(y)

    return sweep


def timed(fn: Callable[[], None]) -> tuple[float, int]:
    """Seconds and minor page faults of one call."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
