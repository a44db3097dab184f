"""The registry of optimizer specs: one entry per optimizer, read by tests, benchmarks and the CLI.

Variants are data (``sgd-nomom`` is SGD with ``momentum=0``), as in timm's ``OptimInfo``. Defaults
are not restated here: they are read from each class's signature, the one source of truth.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from fused_ft.optim import LAMB, LARS, SGD, AdamW

__all__ = ["OPTIMIZERS", "UPDATES", "OptimizerSpec", "Update", "defaults_of"]


def defaults_of(cls: type) -> dict[str, Any]:
    """A class's constructor defaults, read from its signature."""
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _torch_sgd(params, **kw):
    return torch.optim.SGD(params, **kw)


def _torch_adamw(params, **kw):
    return torch.optim.AdamW(params, **kw)


def _timm_lars(params, **kw):
    from timm.optim import Lars

    return Lars(params, **kw)


def _timm_lamb(params, **kw):
    from timm.optim import Lamb

    return Lamb(params, **kw)


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything the tests, benchmarks and CLI need to know about one optimizer.

    Attributes:
        name: registry key, also the backend modules' function name.
        cls: the fused_ft class.
        reference: builds the independent implementation it must match (torch.optim or timm.optim).
        reference_rtol: relative tolerance of the trajectory match against ``reference`` (fp32).
        variants: named keyword sets covering every option (the first is the plain one).
        invalid: (kwargs, exception type, message regex) triples the constructor must refuse.
    """

    name: str
    cls: type
    reference: Callable[..., torch.optim.Optimizer]
    reference_rtol: float
    variants: Mapping[str, Mapping[str, Any]]
    invalid: tuple[tuple[Mapping[str, Any], type, str], ...] = field(default=())

    @property
    def defaults(self) -> dict[str, Any]:
        return defaults_of(self.cls)


_COMMON_INVALID = (
    (dict(lr=-1e-3), ValueError, r"Invalid lr: -0\.001"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, r"Invalid lr: tensor with 2 elements"),
    (dict(lr="0.1"), TypeError, r"Invalid lr: '0\.1'"),
    (dict(backend="cuda"), ValueError, r"Invalid backend: 'cuda'"),
)

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        name="sgd", cls=SGD, reference=_torch_sgd, reference_rtol=1e-6,
        variants={
            "momentum": dict(lr=0.05, momentum=0.9),
            "nomom": dict(lr=0.05),
            "nesterov-wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
            "dampening-maximize": dict(lr=1e-3, momentum=0.8, dampening=0.3, maximize=True, weight_decay=1e-3),
        },
        invalid=_COMMON_INVALID + (
            (dict(momentum=-0.9), ValueError, r"Invalid momentum: -0\.9"),
            (dict(weight_decay=-1e-4), ValueError, r"Invalid weight_decay: -0\.0001"),
            (dict(nesterov=True), ValueError, r"Invalid nesterov=True with momentum=0, dampening=0"),
            (dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError, r"Invalid nesterov=True .*dampening=0\.1"),
            (dict(differentiable=True), ValueError, r"Invalid differentiable: True"),
            (dict(fused=True, foreach=True), RuntimeError, r"Invalid fused=True with foreach=True"),
        ),
    ),
    "adamw": OptimizerSpec(
        name="adamw", cls=AdamW, reference=_torch_adamw, reference_rtol=1e-6,
        variants={
            "default": dict(lr=1e-3),
            "amsgrad": dict(lr=1e-3, amsgrad=True, weight_decay=0.05),
            "maximize": dict(lr=1e-4, maximize=True, betas=(0.8, 0.99), eps=1e-6),
            "no-wd": dict(lr=1e-3, weight_decay=0.0),
        },
        invalid=_COMMON_INVALID + (
            (dict(eps=-1e-8), ValueError, r"Invalid eps: -1e-08"),
            (dict(betas=(1.0, 0.999)), ValueError, r"Invalid betas\[0\]: 1\.0"),
            (dict(betas=(0.9, -0.1)), ValueError, r"Invalid betas\[1\]: -0\.1"),
            (dict(weight_decay=-0.01), ValueError, r"Invalid weight_decay: -0\.01"),
        ),
    ),
    "lars": OptimizerSpec(
        name="lars", cls=LARS, reference=_timm_lars, reference_rtol=1e-5,
        variants={
            # trust_clip and nesterov never together: a backend that swaps the two flags must fail
            "momentum-wd-trust-clip": dict(lr=0.5, momentum=0.9, weight_decay=1e-4, trust_clip=True),
            "plain": dict(lr=0.05),
            "nesterov-wd": dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-4),
            "always-adapt-dampening": dict(lr=0.5, momentum=0.9, dampening=0.1, always_adapt=True),
        },
        invalid=_COMMON_INVALID + (
            (dict(momentum=-0.1), ValueError, r"Invalid momentum: -0\.1"),
            (dict(weight_decay=-1.0), ValueError, r"Invalid weight_decay: -1\.0"),
            (dict(trust_coeff=-1e-3), ValueError, r"Invalid trust_coeff: -0\.001"),
            (dict(nesterov=True), ValueError, r"Invalid nesterov=True"),
        ),
    ),
    "lamb": OptimizerSpec(
        name="lamb", cls=LAMB, reference=_timm_lamb, reference_rtol=1e-5,
        variants={
            "default": dict(lr=1e-3),
            "trust-clip-no-clipping": dict(lr=1e-3, trust_clip=True, max_grad_norm=None),
            "no-averaging-always-adapt": dict(lr=1e-3, grad_averaging=False, always_adapt=True, weight_decay=0.0),
            "decoupled-corrected": dict(lr=1e-3, decoupled_decay=True, corrected_weight_decay=True,
                                        bias_correction=False),
        },
        invalid=_COMMON_INVALID + (
            (dict(eps=-1e-6), ValueError, r"Invalid eps: -1e-06"),
            (dict(betas=(0.9, 1.5)), ValueError, r"Invalid betas\[1\]: 1\.5"),
            (dict(max_grad_norm=0.0), ValueError, r"Invalid max_grad_norm: 0\.0"),
            (dict(weight_decay=-0.01), ValueError, r"Invalid weight_decay: -0\.01"),
        ),
    ),
}


@dataclass(frozen=True)
class Update:
    """One of the five kernel updates: an optimizer with fixed options, and its roofline bytes.

    ``min_bytes_per_param`` counts each fp32 byte that must cross memory once: read grad, read and
    write param, read and write each state tensor (SGD momentum: 4 + 8 + 8 = 20).
    """

    name: str
    optimizer: str
    kwargs: Mapping[str, Any]
    min_bytes_per_param: int


UPDATES: dict[str, Update] = {
    u.name: u
    for u in (
        Update("sgd", "sgd", dict(lr=1e-3, momentum=0.9), 20),
        Update("sgd-nomom", "sgd", dict(lr=1e-3), 12),
        Update("adamw", "adamw", dict(lr=1e-3), 28),
        Update("lars", "lars", dict(lr=0.1, momentum=0.9, weight_decay=1e-4), 20),
        Update("lamb", "lamb", dict(lr=1e-3), 28),
    )
}
