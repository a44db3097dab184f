"""The paper's preprocessing per dataset (Appendix A, "Data augmentation and input preprocessing").

Normalisation uses CLIP's mean/std, as every model in the paper is fine-tuned from a pretrained
ImageNet/CLIP checkpoint whose statistics are close; pass your own transforms for other models.
"""
from __future__ import annotations

__all__ = ["paper_transforms"]

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def paper_transforms(kind: str, size: int = 224):
    """(train transform, test transform) for a dataset kind; ``size`` replaces 224 (256 scales with it)."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    big = round(size * 256 / 224)
    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    if kind == "fmow":  # already 224x224: flips only
        return T.Compose([T.Resize(size), T.RandomHorizontalFlip(), *norm]), T.Compose([T.Resize(size), *norm])
    if kind == "camelyon":  # bilinear resize, flips
        resize = T.Resize((size, size))
        return T.Compose([resize, T.RandomHorizontalFlip(), *norm]), T.Compose([resize, *norm])
    if kind == "domainnet":
        return (T.Compose([T.Resize((big, big), bicubic), T.RandomCrop(size), T.RandomHorizontalFlip(), *norm]),
                T.Compose([T.Resize((size, size), bicubic), *norm]))
    if kind == "waterbirds":
        same = T.Compose([T.Resize((size, size), bicubic), T.CenterCrop(size), *norm])
        return same, same
    # living17 and any ImageFolder: the Living-17 recipe
    return (T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm]),
            T.Compose([T.Resize(big), T.CenterCrop(size), *norm]))
