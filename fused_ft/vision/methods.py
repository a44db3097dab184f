"""The paper's fine-tuning methods by name, and :func:`create_optimizer` that builds them.

Names and defaults follow Kumar et al. (Appendix A, Tables 5 and 7): torch's defaults except SGD
momentum 0.9; AdamW weight decay 0.01, betas (0.9, 0.999), eps 1e-8. Each method is data: the
optimizer from :data:`fused_ft.optim.OPTIMIZER_CLASSES`, its keyword arguments, what is frozen, the
embedding's learning-rate factor, the paper's 6-point learning-rate grid and the schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from fused_ft._validation import LR
from fused_ft.vision.embedding import embedding_params
from fused_ft.vision.layers import head_params, model_layers
from fused_ft.optim import OPTIMIZER_CLASSES

__all__ = ["METHODS", "Method", "SGD_LRS", "ADAMW_LRS", "LP_FT_LR_DIVISOR", "create_optimizer", "method"]

SGD_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
ADAMW_LRS = (3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4)
LP_FT_LR_DIVISOR = 10.0  # Appendix A: after a linear probe, every fine-tuning LR is divided by 10
# Not in the paper (it gives no grid for these): LARS steps like SGD scaled by a trust ratio near 1e-3,
# LAMB like Adam scaled per layer; both are swept over 3e-5..1e-2 around timm's typical lr.
TRUST_RATIO_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)

_SGD = {"momentum": 0.9}
_ADAMW = {"weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8}


@dataclass(frozen=True)
class Method:
    """One fine-tuning method of the paper.

    Attributes:
        name: the paper's method, as a key (``sgd-freeze-embed``).
        description: one line, with the paper's name.
        optimizer: key into :data:`fused_ft.optim.OPTIMIZER_CLASSES`.
        kwargs: the optimizer's arguments (the paper's defaults); ``create_optimizer`` overrides win.
        freeze: ``none``, ``embedding``, ``embedding-not-ln`` (keep CLIP's ln_pre trainable),
            ``all-but-head`` (linear probe) or ``gradual`` (all but the head at first).
        embed_lr_scale: learning-rate factor of the embedding group (0.2 for "5x lower LR on embed").
        lr_grid: the learning rates of the paper's sweep for this method.
        schedule: ``cosine`` (to 0 over all steps) or ``gradual-unfreeze`` (see fused_ft.vision.unfreeze).
    """

    name: str
    description: str
    optimizer: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    freeze: str = "none"
    embed_lr_scale: float = 1.0
    lr_grid: tuple[float, ...] = SGD_LRS
    schedule: str = "cosine"

    @property
    def default_lr(self) -> float:
        """The middle of the paper's grid (its optimum is chosen to sit inside the grid)."""
        return self.lr_grid[len(self.lr_grid) // 2]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sgd", "SGD (momentum 0.9), all layers trained", "sgd", _SGD),
        Method("sgd-nomom", "SGD (no momentum): no optimizer state", "sgd", {"momentum": 0.0}),
        Method("sgd-wd", "SGD (weight decay 0.01), the Table 7 control", "sgd", {**_SGD, "weight_decay": 0.01}),
        Method("adamw", "AdamW (weight decay 0.01)", "adamw", _ADAMW, lr_grid=ADAMW_LRS),
        Method("sgd-freeze-embed", "SGD (freeze-embed): the paper's method", "sgd", _SGD, freeze="embedding"),
        Method("sgd-freeze-embed-nomom", "SGD (freeze-embed, no momentum): least memory", "sgd",
               {"momentum": 0.0}, freeze="embedding"),
        Method("sgd-freeze-embed-not-ln", "SGD (freeze-embed, not layer-norm): CLIP's ln_pre still trains",
               "sgd", _SGD, freeze="embedding-not-ln"),
        Method("sgd-embed-lr-0.2x", "SGD (5x lower LR on the embedding layer)", "sgd", _SGD, embed_lr_scale=0.2),
        Method("adamw-freeze-embed", "AdamW (freeze-embed)", "adamw", _ADAMW, freeze="embedding", lr_grid=ADAMW_LRS),
        Method("lars", "LARS (momentum 0.9), layer-wise trust ratio", "lars", {"momentum": 0.9},
               lr_grid=TRUST_RATIO_LRS),
        Method("lamb", "LAMB, layer-wise trust ratio on Adam updates", "lamb", {}, lr_grid=TRUST_RATIO_LRS),
        Method("linear-probe", "Linear probe: only the head trains (SGD, momentum 0.9)", "sgd", _SGD,
               freeze="all-but-head"),
        Method("gradual-unfreeze", "Gradual unfreezing from the top, LR x exp(3.73 (1 - t/(T-1)))", "sgd", _SGD,
               freeze="gradual", schedule="gradual-unfreeze"),
    )
}


def method(name: str) -> Method:
    """The method called ``name``; an unknown name lists the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Invalid method: {name!r} (valid: {', '.join(METHODS)})") from None


def create_optimizer(
    model: nn.Module,
    method_name: str,
    lr: float | None = None,
    *,
    after_linear_probe: bool = False,
    embedding: Mapping[str, Any] | None = None,
    backend: str = "auto",
    **overrides: Any,
) -> torch.optim.Optimizer:
    """Freeze what the method freezes and build its fused_ft optimizer over ``model``.

    Frozen parameters get ``requires_grad=False`` (no gradient memory) and live in a ``frozen=True``
    param group (no state, no kernel launch), so a later unfreeze (gradual unfreezing, LP-FT) only
    flips the flag. Parameters the method trains get ``requires_grad=True``.

    Args:
        model: a timm model or :class:`fused_ft.vision.models.ClipClassifier` (any model with ``embedding``).
        method_name: a key of :data:`METHODS` (``sgd-freeze-embed``, ``adamw``, ...).
        lr: the starting learning rate (default: the middle of the method's paper grid).
        after_linear_probe: LP-FT's second stage: divide ``lr`` by 10, as the paper does.
        embedding: options for :func:`fused_ft.embedding_params` (``names``, ``pattern``, ``stem_only``).
        backend: the fused_ft backend.
        **overrides: optimizer arguments that replace the method's defaults (``momentum=0.8``).

    Example:
        >>> import timm, fused_ft
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
        >>> opt = fused_ft.create_optimizer(model, "sgd-freeze-embed", lr=1e-3)
        >>> model.patch_embed.proj.weight.requires_grad
        False
    """
    m = method(method_name)
    cls = OPTIMIZER_CLASSES[m.optimizer]
    lr = m.default_lr if lr is None else lr
    LR.check("lr", lr)  # the optimizers' own rule, so that the CLI and the API say the same
    if after_linear_probe:
        lr = lr / LP_FT_LR_DIVISOR
    kwargs = {**m.kwargs, **overrides}
    groups = _param_groups(model, m, lr, dict(embedding or {}))
    optimizer = cls(groups, lr=lr, backend=backend, **kwargs)  # validates everything before freezing
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.requires_grad_(not group["frozen"])
    return optimizer


def _param_groups(model: nn.Module, m: Method, lr: float, embedding: dict) -> list[dict]:
    named = list(model.named_parameters())
    if m.freeze == "gradual":
        layers = model_layers(model, **embedding)
        top = len(layers) - 1
        return [{"params": [p for _, p in layer.params], "layer": layer.name, "frozen": i != top}
                for i, layer in enumerate(layers)]
    if m.freeze == "all-but-head":
        head = {id(p) for _, p in head_params(model)}
        if not head:
            raise ValueError(f"Invalid model for {m.name!r}: {type(model).__name__} has no classifier head")
        return _split(named, {id(p) for _, p in named} - head, {"frozen": True})
    if m.freeze == "none" and m.embed_lr_scale == 1.0:
        return [{"params": [p for _, p in named]}]
    options = {**embedding, "include_norm": m.freeze != "embedding-not-ln"}
    special = {id(p) for _, p in embedding_params(model, **options)}
    if m.freeze == "none":
        return _split(named, special, {"lr": lr * m.embed_lr_scale, "layer": "embedding"})
    return _split(named, special, {"frozen": True, "layer": "embedding"})


def _split(named, special: set[int], special_options: dict) -> list[dict]:
    """Two groups: the other parameters plain, then the ``special`` ones with ``special_options``."""
    inside = [p for _, p in named if id(p) in special]
    outside = [p for _, p in named if id(p) not in special]
    return [{"params": outside}, {"params": inside, **special_options}]
