"""shift-lab: a dataset family with a controllable distribution shift, generated on the fly (no download).

Images are 32x32 shapes drawn with torch on a coordinate grid. Two shifts:

- ``shift-lab`` (style shift, like DomainNet's sketch -> real): ID images are *filled* shapes in
  warm colours on a dark, quiet background; OOD images are *outlines* in cool colours on a light,
  noisy background. Same 4 classes (circle, square, triangle, cross).
- ``shift-lab:spurious`` (spurious background, like Waterbirds): in ID data 95% of each class sits
  on its "own" background hue; in OOD data the hue is drawn at random.

A tiny ViT and a tiny ConvNet are "pretrained" in-process on a *source* task (6 shapes, every style
and palette mixed, so the features know outlines too) with AdamW, or with SGD for the paper's
Appendix E control, and cached on disk after the first run (``$FUSED_FT_CACHE`` or
``~/.cache/fused_ft``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fused_ft._extras import require

__all__ = ["SHIFT_LAB_MODELS", "ShiftLabConfig", "make_splits", "render_images", "create_pretrained",
           "check_pretrain_optimizer", "cache_dir"]

IMAGE_SIZE = 32
TARGET_SHAPES = ("circle", "square", "triangle", "cross")
# told apart under any rotation and in both styles (a ring would be an outlined circle)
SOURCE_SHAPES = TARGET_SHAPES + ("bar", "half-disk")
WARM = torch.tensor([[0.9, 0.3, 0.2], [0.95, 0.7, 0.1], [0.8, 0.2, 0.5]])
COOL = torch.tensor([[0.2, 0.4, 0.95], [0.1, 0.8, 0.7], [0.5, 0.3, 0.9]])
HUES = torch.tensor([[0.6, 0.1, 0.1], [0.1, 0.5, 0.1], [0.1, 0.1, 0.6], [0.5, 0.5, 0.1]])


@dataclass(frozen=True)
class ShiftLabConfig:
    """Sizes of the splits; the data seed is fixed so every run sees the same images."""

    train: int = 2000
    id_val: int = 500
    id_test: int = 1000
    ood_test: int = 1000
    data_seed: int = 1234


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.linspace(-1, 1, IMAGE_SIZE)
    return torch.meshgrid(coords, coords, indexing="ij")


def _masks(shape: torch.Tensor, size: torch.Tensor, angle: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
           shrink: float) -> torch.Tensor:
    """Boolean masks (N, H, W) of shape index ``shape`` (into SOURCE_SHAPES), per image parameters."""
    yy, xx = _grid()
    x = xx[None] - cx[:, None, None]
    y = yy[None] - cy[:, None, None]
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = c * x + s * y, -s * x + c * y
    r = (size * shrink)[:, None, None]
    radius = torch.sqrt(u**2 + v**2)
    candidates = {
        "circle": radius < r,
        "square": torch.maximum(u.abs(), v.abs()) < 0.8 * r,
        "triangle": (v > -0.5 * r) & (v < r - 1.7 * u.abs()),
        "cross": ((u.abs() < r / 3) & (v.abs() < r)) | ((v.abs() < r / 3) & (u.abs() < r)),
        "bar": (u.abs() < r) & (v.abs() < r / 3),
        "half-disk": (radius < r) & (v > 0),
    }
    stacked = torch.stack([candidates[name] for name in SOURCE_SHAPES], 1)  # N, S, H, W
    return stacked[torch.arange(len(shape)), shape]


def render_images(shape: torch.Tensor, style: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, noise: torch.Tensor,
           generator: torch.Generator) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1]: ``style`` 0 filled, 1 outline; ``fg``/``bg`` (N, 3) colours."""
    n = len(shape)
    size = 0.45 + 0.3 * torch.rand(n, generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    cx, cy = (0.5 * torch.rand(2, n, generator=generator) - 0.25)
    outer = _masks(shape, size, angle, cx, cy, 1.0)
    inner = _masks(shape, size, angle, cx, cy, 0.7)
    mask = torch.where(style[:, None, None] == 1, outer & ~inner, outer).float()[:, None]
    image = bg[:, :, None, None] * (1 - mask) + fg[:, :, None, None] * mask
    image = image + noise[:, None, None, None] * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return image.clamp_(0, 1)


def _pick(palette: torch.Tensor, n: int, generator: torch.Generator, jitter: float = 0.08) -> torch.Tensor:
    index = torch.randint(0, len(palette), (n,), generator=generator)
    return (palette[index] + jitter * torch.randn(n, 3, generator=generator)).clamp(0, 1)


def _style_split(n: int, ood: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, len(TARGET_SHAPES), (n,), generator=generator)
    if ood:
        style, fg = torch.ones(n, dtype=torch.long), _pick(COOL, n, generator)
        bg = 0.75 + 0.1 * torch.rand(n, 3, generator=generator)
        noise = torch.full((n,), 0.12)
    else:
        style, fg = torch.zeros(n, dtype=torch.long), _pick(WARM, n, generator)
        bg = 0.1 * torch.rand(n, 3, generator=generator)
        noise = torch.full((n,), 0.03)
    return render_images(y, style, fg, bg, noise, generator), y


def _spurious_split(n: int, ood: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, len(TARGET_SHAPES), (n,), generator=generator)
    aligned = torch.rand(n, generator=generator) < (0.0 if ood else 0.95)
    hue = torch.where(aligned, y, torch.randint(0, len(HUES), (n,), generator=generator))
    bg = (HUES[hue] + 0.05 * torch.randn(n, 3, generator=generator)).clamp(0, 1)
    fg = _pick(torch.tensor([[0.9, 0.9, 0.9]]), n, generator)
    style = torch.randint(0, 2, (n,), generator=generator)
    return render_images(y, style, fg, bg, torch.full((n,), 0.05), generator), y


SPLITTERS = {"style": _style_split, "spurious": _spurious_split}


def make_splits(variant: str = "style", config: ShiftLabConfig = ShiftLabConfig()) -> dict[str, tuple]:
    """{"train", "id_val", "id_test", "ood_test"} -> (images, labels), identical for a given config."""
    if variant not in SPLITTERS:
        raise ValueError(f"Invalid shift-lab variant: {variant!r} (choose from {', '.join(SPLITTERS)})")
    split = SPLITTERS[variant]
    g = torch.Generator().manual_seed(config.data_seed)
    return {"train": split(config.train, False, g), "id_val": split(config.id_val, False, g),
            "id_test": split(config.id_test, False, g), "ood_test": split(config.ood_test, True, g)}


def source_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining task: 6 shapes, both styles, every palette and background mixed."""
    y = torch.randint(0, len(SOURCE_SHAPES), (n,), generator=generator)
    style = torch.randint(0, 2, (n,), generator=generator)
    # any colours, but shape and background always contrast (dark on light or light on dark)
    dark, light = 0.4 * torch.rand(n, 3, generator=generator), 0.6 + 0.4 * torch.rand(n, 3, generator=generator)
    swap = (torch.rand(n, generator=generator) < 0.5)[:, None]
    fg, bg = torch.where(swap, dark, light), torch.where(swap, light, dark)
    noise = 0.12 * torch.rand(n, generator=generator)
    return render_images(y, style, fg, bg, noise, generator), y


# The two tiny models: timm architectures at shift-lab's size (checked by name in fused_ft.vision.models).
SHIFT_LAB_MODELS = {
    # 8x8 patches (16 tokens): a fine-tuning step of 64 images takes ~50 ms on one CPU core
    "shift-lab-vit": ("vit_tiny_patch16_224", dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=128, depth=4,
                                                   num_heads=4)),
    "shift-lab-convnet": ("resnet10t", dict()),
}


@dataclass(frozen=True)
class PretrainRecipe:
    optimizer: str = "adamw"  # or "sgd" (Appendix E control)
    examples: int = 8000
    epochs: int = 20  # ViTs learn slowly from little data: ~2 minutes on 2 cores, once
    batch_size: int = 128
    seed: int = 0


def cache_dir() -> Path:
    return Path(os.environ.get("FUSED_FT_CACHE", Path.home() / ".cache" / "fused_ft")) / "shift-lab"


def build(name: str, num_classes: int) -> nn.Module:
    timm = require("timm", f"the shift-lab model {name!r}")

    if name not in SHIFT_LAB_MODELS:
        raise ValueError(f"Invalid shift-lab model: {name!r} (choose from {', '.join(SHIFT_LAB_MODELS)})")
    arch, kwargs = SHIFT_LAB_MODELS[name]
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def create_pretrained(name: str, num_classes: int, optimizer: str = "adamw", recipe: PretrainRecipe | None = None,
                      progress: bool = True) -> nn.Module:
    """The model pretrained on the source task with ``optimizer`` (cached), with a new ``num_classes`` head."""
    recipe = recipe or PretrainRecipe(optimizer=optimizer)
    key = hashlib.sha256(json.dumps([name, asdict(recipe), SHIFT_LAB_MODELS.get(name, [None, {}])[1]],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}-{recipe.optimizer}-{key}.pt"
    backbone = build(name, len(SOURCE_SHAPES))
    if path.exists():
        backbone.load_state_dict(torch.load(path, weights_only=True))
    else:
        # the pretraining seeds and draws torch's RNG: fork it, so that the new head below comes from the
        # caller's seed whether or not the cache existed (it did not: a run's first head differed from its rerun's)
        with torch.random.fork_rng(devices=[]):
            _pretrain(backbone, recipe, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(backbone.state_dict(), tmp)
        tmp.replace(path)  # atomic: an interrupted pretraining leaves no half-written cache
    backbone.reset_classifier(num_classes)
    return backbone


# Source-task learning rates: a standard AdamW recipe, and an SGD one tuned to reach a similar source accuracy.
_PRETRAIN_OPTIMIZERS = {"adamw": ("adamw", dict(lr=2e-3, weight_decay=0.05)),
                        "sgd": ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=5e-4))}


def check_pretrain_optimizer(optimizer: str) -> None:
    """What ``pretrained=`` may name for a shift-lab model."""
    if optimizer not in _PRETRAIN_OPTIMIZERS:
        choices = ", ".join(_PRETRAIN_OPTIMIZERS)
        raise ValueError(f"Invalid pretraining optimizer: {optimizer!r} (choose from {choices})")


def _pretrain(model: nn.Module, recipe: PretrainRecipe, progress: bool) -> None:
    from tqdm import tqdm

    from fused_ft.optim import OPTIMIZER_CLASSES

    check_pretrain_optimizer(recipe.optimizer)
    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    x, y = source_task(recipe.examples, g)
    opt_name, kwargs = _PRETRAIN_OPTIMIZERS[recipe.optimizer]
    optimizer = OPTIMIZER_CLASSES[opt_name](model.parameters(), **kwargs)
    steps = recipe.epochs * math.ceil(recipe.examples / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=kwargs["lr"], total_steps=steps,
                                                    pct_start=0.1, cycle_momentum=False)
    model.train()
    with tqdm(total=steps, desc=f"pretraining {recipe.optimizer}", disable=not progress, leave=False) as bar:
        for _ in range(recipe.epochs):
            order = torch.randperm(recipe.examples, generator=g)
            for i in range(0, recipe.examples, recipe.batch_size):
                idx = order[i:i + recipe.batch_size]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
