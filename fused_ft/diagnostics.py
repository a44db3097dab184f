"""Layer-gradient diagnostics (Kumar et al., Sec. 3.2, Eq. 3.1, Appendix F): does a model need freeze-embed?

``G_l = mean over minibatches B of ||g_l(B)||_2`` at the current (pretrained) weights, for every layer
``l`` of :func:`fused_ft.layers.model_layers`, also divided by the layer's parameter norm and by
``sqrt(#params)``. When the embedding's ``G`` is an outlier against the middle layers, SGD over-trains
it and freezing it is recommended.
"""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from fused_ft.layers import model_layers

__all__ = ["LayerGradNorm", "Verdict", "layer_grad_norms", "sample_batches", "verdict", "write_csv", "plot_grad_norms",
           "OUTLIER_RATIO"]

# The embedding counts as an outlier when its gradient norm is at least this many times the median
# middle layer's. The paper's CLIP ViT-B/16 embedding gradient is "about 5x larger" (Appendix B); the
# BiT ResNets, where SGD and AdamW tie, show no outlier. 3x sits between the two.
OUTLIER_RATIO = 3.0


@dataclass(frozen=True)
class LayerGradNorm:
    """One layer's row of the diagnostic."""

    index: int
    layer: str
    role: str  # embedding, middle or head
    num_params: int
    grad_norm: float  # mean over minibatches of ||g_l||_2
    param_norm: float
    grad_over_param_norm: float
    grad_over_sqrt_params: float


@dataclass(frozen=True)
class Verdict:
    embedding_ratio: float  # embedding grad norm / median middle-layer grad norm
    recommend_freeze_embed: bool

    def __str__(self) -> str:
        advice = ("freeze-embed is recommended (use sgd-freeze-embed)" if self.recommend_freeze_embed
                  else "freeze-embed is not needed: the embedding gradient is not an outlier")
        return (f"embedding gradient norm = {self.embedding_ratio:.2f}x the median middle layer "
                f"(outlier at >= {OUTLIER_RATIO:g}x): {advice}")


def layer_grad_norms(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    **embedding_options,
) -> list[LayerGradNorm]:
    """Per-layer mean minibatch gradient norms at the model's current weights (Eq. 3.1).

    Every parameter gets a gradient for the measurement (frozen ones included: the diagnostic asks
    what SGD *would* do); ``requires_grad`` and existing ``.grad`` are restored afterwards. The model
    stays in its current train/eval mode.

    Args:
        model: the classifier (see :func:`fused_ft.models.create_model`).
        batches: (inputs, targets) minibatches.
        loss_fn: ``loss_fn(model(inputs), targets)``, cross-entropy by default.
        **embedding_options: how to find the embedding (see :func:`fused_ft.embedding_params`).

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
        >>> rows = layer_grad_norms(m, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))])
        >>> rows[0].role, rows[-1].role
        ('embedding', 'head')
    """
    layers = [layer for layer in model_layers(model, **embedding_options) if layer.diagnostic]
    params = [p for _, p in model.named_parameters()]
    saved = [(p.requires_grad, p.grad) for p in params]
    sums = [0.0] * len(layers)
    count = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for inputs, targets in batches:
            for p in params:
                p.grad = None
            loss_fn(model(inputs), targets).backward()
            for i, layer in enumerate(layers):
                sq = sum(float(p.grad.double().pow(2).sum()) for _, p in layer.diagnostic if p.grad is not None)
                sums[i] += math.sqrt(sq)
            count += 1
    finally:
        for p, (requires_grad, grad) in zip(params, saved):
            p.grad = grad
            p.requires_grad_(requires_grad)
    if count == 0:
        raise ValueError("Invalid batches: no minibatch was given")
    rows = []
    for i, layer in enumerate(layers):
        n = sum(p.numel() for _, p in layer.diagnostic)
        g = sums[i] / count
        w = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for _, p in layer.diagnostic))
        rows.append(LayerGradNorm(i, layer.name, layer.role, n, g, w, g / w if w > 0 else math.inf, g / math.sqrt(n)))
    return rows


def sample_batches(dataset, batch_size: int, count: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` minibatches of a (image, label) dataset, drawn without replacement with a fixed seed."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: count * batch_size].tolist()
    return [tuple(torch.stack([torch.as_tensor(dataset[i][k]) for i in idx[j:j + batch_size]]) for k in (0, 1))
            for j in range(0, len(idx), batch_size)]


def verdict(rows: list[LayerGradNorm]) -> Verdict:
    """Is the embedding's gradient an outlier against the middle layers?"""
    embed = [r.grad_norm for r in rows if r.role == "embedding"]
    middle = [r.grad_norm for r in rows if r.role == "middle"]
    if not embed or not middle:
        raise ValueError("Invalid rows: a verdict needs an embedding layer and at least one middle layer")
    median = statistics.median(middle)
    ratio = embed[0] / median if median > 0 else math.inf
    return Verdict(ratio, ratio >= OUTLIER_RATIO)


def write_csv(rows: list[LayerGradNorm], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return path


_STYLE = {"embedding": ("s", "red"), "middle": ("o", "black"), "head": ("^", "green")}


def plot_grad_norms(rows: list[LayerGradNorm], path: str | Path, title: str = "") -> Path:
    """Figure 2 of the paper: per-layer gradient norms, log scale; embedding red square, head green
    triangle, middle layers black circles. The two normalised panels leave out the head, as the
    paper's Appendix F does, because the randomly initialised head dwarfs the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("grad_norm", "gradient norm", True), ("grad_over_param_norm", "gradient norm / parameter norm", False),
              ("grad_over_sqrt_params", "gradient norm / sqrt(#params)", False)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label, with_head) in zip(axes, panels):
        for role, (marker, color) in _STYLE.items():
            if role == "head" and not with_head:
                continue
            pts = [(r.index, getattr(r, key)) for r in rows if r.role == role]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, s=60 if role != "middle" else 25,
                           label=role, zorder=3 if role != "middle" else 2)
        ax.set_yscale("log")
        ax.set_xlabel("layer (bottom to top)")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        if not with_head:
            ax.set_title("head left out: its random init dwarfs the rest", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
