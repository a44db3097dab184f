"""Eq. 3.1: per-layer mean minibatch gradient norms at the model's current weights."""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fused_ft.vision.layers import model_layers

Batch = tuple[torch.Tensor, torch.Tensor]
Data = Union[Dataset, DataLoader, Iterable[Batch]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_BATCHES = 4
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class LayerGradNorm:
    """One layer's row of the diagnostic, for one model (one head seed).

    ``grad_norm`` is Eq. 3.1's ``G_l``: the mean over minibatches of ``||g_l(B)||_2``;
    ``batch_grad_norms`` holds each minibatch's ``||g_l(B)||_2`` in order, from which the verdict's
    interval is drawn. Norms are in the loss's units per parameter unit, computed in float64.
    """

    index: int
    layer: str
    role: str  # embedding, middle or head
    num_params: int
    grad_norm: float
    param_norm: float
    grad_over_param_norm: float
    grad_over_sqrt_params: float
    batch_grad_norms: tuple[float, ...] = ()
    head_seed: int | None = None


def sample_batches(dataset: Dataset, batch_size: int = DEFAULT_BATCH_SIZE, count: int = DEFAULT_BATCHES,
                   seed: int = 0) -> list[Batch]:
    """``count`` minibatches of ``batch_size`` items of an (image, label) dataset, drawn without
    replacement in the order of ``torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))``.

    Every minibatch is full (a short one would weigh its larger gradient noise into Eq. 3.1's mean):
    a dataset with fewer than ``count * batch_size`` items gives fewer minibatches, with a warning.

    Raises:
        ValueError: the dataset holds fewer than ``batch_size`` items.
    """
    full = min(count, len(dataset) // batch_size)
    if full == 0:
        raise ValueError(f"Invalid batch_size: {batch_size} (the data holds {len(dataset)} images, not one full "
                         "minibatch)")
    if full < count:
        warnings.warn(f"{count} minibatches of {batch_size} were asked for, the data holds {len(dataset)} images: "
                      f"measuring {full}", stacklevel=2)
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: full * batch_size].tolist()
    return [tuple(torch.stack([torch.as_tensor(dataset[i][k]) for i in idx[j:j + batch_size]]) for k in (0, 1))
            for j in range(0, len(idx), batch_size)]


def as_batches(data: Data, batches: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               seed: int = 0) -> list[Batch]:
    """The minibatches a measurement reads, as a list (so that every head seed sees the same ones).

    A :class:`~torch.utils.data.Dataset` is sampled with :func:`sample_batches` (``batches`` of
    ``batch_size``, default 4, seeded by ``seed``); a DataLoader or any iterable of ``(inputs,
    targets)`` is read in its own order, up to ``batches`` minibatches (all of them by default).
    """
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return sample_batches(data, batch_size, DEFAULT_BATCHES if batches is None else batches, seed)
    out = []
    for batch in data:
        if batches is not None and len(out) == batches:
            break
        out.append((batch[0], batch[1]))
    return out


def layer_grad_norms(
    model: nn.Module,
    data: Data,
    loss_fn: LossFn = nn.functional.cross_entropy,
    *,
    batches: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    head_seed: int | None = None,
    on_batch: Callable[[], None] | None = None,
    **embedding_options,
) -> list[LayerGradNorm]:
    """Per-layer mean minibatch gradient norms at the model's current weights (Kumar et al., Eq. 3.1).

    Every parameter gets a gradient for the measurement (frozen ones included: the diagnostic asks
    what SGD *would* do); ``requires_grad`` and existing ``.grad`` are restored afterwards. The model
    stays in its current train/eval mode; inputs move to the device and floating dtype of its first
    parameter.

    Args:
        model: the classifier (see :func:`fused_ft.vision.models.create_model`).
        data: a Dataset of (image, label) items (sampled: ``batches`` x ``batch_size``, seeded by
            ``seed``), a DataLoader, or an iterable of ``(inputs, targets)`` minibatches (read in order,
            up to ``batches``). Measure on the training images *without* augmentation
            (:meth:`fused_ft.harness.data.DataBundle.train_without_augmentation`).
        loss_fn: ``loss_fn(model(inputs), targets)``, cross-entropy by default.
        head_seed: recorded in each row (see :func:`grad_norms_over_head_seeds`).
        on_batch: called after each minibatch (a progress bar's ``update``).
        **embedding_options: how to find the embedding (see :func:`fused_ft.embedding_params`).

    Returns:
        One :class:`LayerGradNorm` per layer of :func:`fused_ft.vision.layers.model_layers`, bottom to top.

    Raises:
        ValueError: no minibatch in ``data``.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
        >>> rows = layer_grad_norms(m, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))])
        >>> rows[0].role, rows[-1].role, len(rows[0].batch_grad_norms)
        ('embedding', 'head', 1)
    """
    batch_list = as_batches(data, batches, batch_size, seed)
    if not batch_list:
        raise ValueError("Invalid data: no minibatch was given")
    layers = [layer for layer in model_layers(model, **embedding_options) if layer.diagnostic]
    params = [p for _, p in model.named_parameters()]
    first = params[0]
    saved = [(p.requires_grad, p.grad) for p in params]
    norms: list[list[float]] = [[] for _ in layers]
    try:
        for p in params:
            p.requires_grad_(True)
        for inputs, targets in batch_list:
            for p in params:
                p.grad = None
            inputs = inputs.to(first.device, first.dtype if inputs.is_floating_point() else inputs.dtype)
            loss_fn(model(inputs), targets.to(first.device)).backward()
            for i, layer in enumerate(layers):
                sq = sum(float(p.grad.double().pow(2).sum()) for _, p in layer.diagnostic if p.grad is not None)
                norms[i].append(math.sqrt(sq))
            if on_batch is not None:
                on_batch()
    finally:
        for p, (requires_grad, grad) in zip(params, saved):
            p.grad = grad
            p.requires_grad_(requires_grad)
    rows = []
    for i, layer in enumerate(layers):
        n = sum(p.numel() for _, p in layer.diagnostic)
        g = math.fsum(norms[i]) / len(norms[i])
        w = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for _, p in layer.diagnostic))
        rows.append(LayerGradNorm(i, layer.name, layer.role, n, g, w, g / w if w > 0 else math.inf, g / math.sqrt(n),
                                  tuple(norms[i]), head_seed))
    return rows


def grad_norms_over_head_seeds(
    build_model: Callable[[], nn.Module],
    data: Data,
    head_seeds: Sequence[int],
    loss_fn: LossFn = nn.functional.cross_entropy,
    *,
    batches: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
    **embedding_options,
) -> list[list[LayerGradNorm]]:
    """:func:`layer_grad_norms` once per head seed, on the same minibatches.

    For each seed ``s`` the model is built as a fine-tuning run with seed ``s`` builds it
    (``torch.manual_seed(s)``, ``random.seed(s)``, then ``build_model()``), so a randomly
    initialised head is the one that run would start from. The measurement reads the RNG on from
    there (dropout, drop-path); the caller's RNG state is left as found.

    Returns:
        One list of rows per head seed, in the order of ``head_seeds``.
    """
    from tqdm import tqdm

    if not head_seeds:
        raise ValueError("Invalid head_seeds: none given (at least one seed)")
    batch_list = as_batches(data, batches, batch_size, seed)
    runs = []
    with tqdm(total=len(head_seeds) * len(batch_list), desc="layer gradient norms", unit="batch",
              disable=not progress, leave=False) as bar:
        for s in head_seeds:
            python_state = random.getstate()
            with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
                torch.manual_seed(s)
                random.seed(s)
                model = build_model()
                # inside the fork too: dropout or drop-path in train mode draws from the seeded state
                runs.append(layer_grad_norms(model, batch_list, loss_fn, head_seed=s, on_batch=bar.update,
                                             **embedding_options))
            random.setstate(python_state)
            del model
    return runs
