"""A model's parameters as an ordered list of layers, bottom to top, each with its role.

Used by the layer-gradient diagnostics (Kumar et al. Eq. 3.1: embedding, each block, head) and by
gradual unfreezing (which unfreezes from the top). Roles:

- ``embedding``: the embedding layer of :func:`fused_ft.embedding_params`, together with the
  position embedding and class tokens that sit beside it (they train or freeze with the bottom).
- ``head``: the classifier (``model.get_classifier()``, else the last ``nn.Linear``).
- ``middle``: everything else, one layer per block. A block is the name up to its last numeric
  index that still has a submodule below it (``blocks.3``, ``stages.0.blocks.1``,
  ``visual.transformer.resblocks.7``); parameters outside numbered blocks form one layer per
  module (``norm``, ``visual.ln_post``) and sit above the blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fused_ft.vision.embedding import POSITION_TOKENS, embedding_params

__all__ = ["Layer", "model_layers", "head_params"]


@dataclass
class Layer:
    """One layer: its name, role and (name, parameter) pairs.

    ``diagnostic`` lists the parameters the paper's gradient plots use: for the embedding, the
    patch embedding alone (Appendix F omits the cls token, position embedding and the layernorm
    after the embedding); for other layers, all of them.
    """

    name: str
    role: str
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    diagnostic: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for _, p in self.params)


def head_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The classifier's parameters: ``get_classifier()`` (timm, ClipClassifier), else the last Linear."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        return []
    ids = {id(p) for p in head.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _block_key(name: str) -> str | None:
    parts = name.split(".")
    for i in range(len(parts) - 3, -1, -1):  # a numeric index followed by a submodule and a leaf
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return None


def model_layers(model: nn.Module, **embedding_options) -> list[Layer]:
    """The model's layers, bottom (embedding) to top (head); every trainable-or-not parameter is in one.

    ``embedding_options`` go to :func:`fused_ft.embedding_params` (``names``, ``pattern``, ``stem_only``).
    """
    named = list(model.named_parameters())
    embed = embedding_params(model, **embedding_options)
    embed_ids = {id(p) for _, p in embed}
    patch_only = {id(p) for _, p in embedding_params(model, **{**embedding_options, "include_norm": False})}
    head = head_params(model)
    head_ids = {id(p) for _, p in head}

    bottom = Layer("embedding", "embedding")
    blocks: dict[str, Layer] = {}
    loose: dict[str, Layer] = {}
    for n, p in named:
        if id(p) in embed_ids or POSITION_TOKENS.search(n):
            bottom.params.append((n, p))
            if id(p) in patch_only:
                bottom.diagnostic.append((n, p))
        elif id(p) in head_ids:
            continue
        else:
            key = _block_key(n)
            table = blocks if key is not None else loose
            key = key if key is not None else (n.rsplit(".", 1)[0] if "." in n else n)
            layer = table.setdefault(key, Layer(key, "middle"))
            layer.params.append((n, p))
            layer.diagnostic.append((n, p))
    top = Layer("head", "head", list(head), list(head))
    layers = [bottom, *blocks.values(), *loose.values(), top]
    return [layer for layer in layers if layer.params]
