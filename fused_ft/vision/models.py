"""Building the paper's models (and any timm or open_clip model) as image classifiers.

One entry point, :func:`create_model`, for timm names, open_clip names and the aliases of the
paper's seven models (Kumar et al., Sec. 2.2). open_clip models become :class:`ClipClassifier`:
the CLIP image tower plus a linear head, so that every model here has the same interface
(images in, logits out) and the same parameter names as open_clip (``visual.conv1``, ...).

Pretrained weights are fetched by timm/open_clip (Hugging Face hub) or read from a local
checkpoint; when they cannot be had, :class:`PretrainedWeightsError` says so in one line.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fused_ft._extras import require

__all__ = ["ALIASES", "ModelAlias", "ClipClassifier", "PretrainedWeightsError", "create_model", "check_input_size",
           "input_size",
           "resolve_model_name"]


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be fetched or read."""


@dataclass(frozen=True)
class ModelAlias:
    """A short name for one of the paper's models: which library builds it and its pretrained tag."""

    library: str  # "timm" or "open_clip"
    name: str
    tag: str
    description: str


ALIASES: dict[str, ModelAlias] = {
    "clip-vit-b16": ModelAlias("open_clip", "ViT-B-16", "openai", "CLIP ViT-B/16 (OpenAI)"),
    "clip-vit-l14": ModelAlias("open_clip", "ViT-L-14", "openai", "CLIP ViT-L/14 (OpenAI)"),
    "openclip-vit-h14": ModelAlias("open_clip", "ViT-H-14", "laion2b_s32b_b79k", "OpenCLIP ViT-H/14 (LAION-2B)"),
    "timm-clip-vit-b16": ModelAlias("timm", "vit_base_patch16_clip_224", "openai", "CLIP ViT-B/16 through timm"),
    "timm-clip-vit-l14": ModelAlias("timm", "vit_large_patch14_clip_224", "openai", "CLIP ViT-L/14 through timm"),
    "vit-b16": ModelAlias("timm", "vit_base_patch16_224", "augreg_in21k", "supervised ViT-B/16 (ImageNet-21k)"),
    "dino-vit-b16": ModelAlias("timm", "vit_base_patch16_224", "dino", "DINO ViT-B/16 (self-supervised)"),
    "convnext-b": ModelAlias("timm", "convnext_base", "fb_in22k", "ConvNeXt-B (ImageNet-21k)"),
    "bit-resnet50": ModelAlias("timm", "resnetv2_50x1_bit", "goog_in21k", "BiT ResNet-50x1 (ImageNet-21k)"),
    "bit-resnet101": ModelAlias("timm", "resnetv2_101x1_bit", "goog_in21k", "BiT ResNet-101x1 (ImageNet-21k)"),
}


class ClipClassifier(nn.Module):
    """A CLIP image tower with a linear head: ``head(visual(x))``.

    The tower keeps open_clip's parameter names under ``visual.`` so that the paper's embedding
    (``visual.conv1``, ``visual.ln_pre``) is found by name.
    """

    def __init__(self, visual: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.output_dim, num_classes, device=_device_of(visual))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.visual(x)
        if isinstance(features, tuple):  # towers built with output_tokens=True
            features = features[0]
        return self.head(features)

    def get_classifier(self) -> nn.Module:
        return self.head


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def resolve_model_name(name: str) -> tuple[str, str, str | None]:
    """(library, model name, default pretrained tag) for an alias, ``timm:NAME``, ``open_clip:NAME``
    (or ``openclip:NAME``) or a bare name.

    A bare name goes to timm when timm knows it, to open_clip otherwise (``ViT-B-16``): timm's names
    are what most users type, and a few (``convnext_base``) are also open_clip towers, whose
    classifier is a different model; ``open_clip:convnext_base`` asks for that one.
    """
    if name in ALIASES:
        a = ALIASES[name]
        return a.library, a.name, a.tag
    library, sep, rest = name.partition(":")
    if sep and library in ("timm", "open_clip", "openclip"):
        return library.replace("openclip", "open_clip"), rest, None
    timm = require("timm", f"model {name!r}")
    if timm.is_model(name.split(".")[0]):
        return "timm", name, None
    open_clip = require("open_clip", f"model {name!r}")
    if name in open_clip.list_models():
        return "open_clip", name, None
    raise ValueError(
        f"Invalid model: {name!r} (not an alias, a timm model or an open_clip model; aliases: {', '.join(ALIASES)})"
    )


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool | str = False,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build an image classifier: a timm model, or an open_clip image tower with a linear head.

    Args:
        name: an alias from :data:`ALIASES` (``clip-vit-b16``), a timm name (``convnext_base``), an
            open_clip name (``ViT-L-14``), or either prefixed (``timm:...``, ``open_clip:...``); a bare
            name both libraries know is timm's (see :func:`resolve_model_name`).
        num_classes: size of the new classification head.
        pretrained: False for random weights; True for the alias's tag (or the library default); a
            string for a specific tag (``openai``, ``laion2b_s32b_b79k``, timm's ``augreg_in21k``).
        checkpoint: a local weights file, used instead of downloading (works offline).
        image_size: input resolution when it differs from the model's default (timm ViTs, open_clip).
        device: where to build; ``"meta"`` builds the structure without memory.

    Raises:
        PretrainedWeightsError: the weights could not be fetched or read (one line: why, and how to
            pass a local checkpoint).

    Example:
        >>> model = create_model("vit_tiny_patch16_224", num_classes=10, image_size=64)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """
    library, model_name, default_tag = resolve_model_name(name)
    tag = (default_tag if pretrained is True else pretrained) or None
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise PretrainedWeightsError(f"Invalid checkpoint: {str(checkpoint)!r} is not a file")
    wants_weights = bool(pretrained) or checkpoint is not None
    offline = bool(pretrained) and checkpoint is None and not _hub_reachable()
    offline_error = PretrainedWeightsError(
        f"Could not fetch pretrained weights for {name!r} (tag {tag!r}): {HUB_HOST} cannot be reached and "
        "they are not in the local cache -- pass a local file with --checkpoint PATH (Python: checkpoint=PATH)")
    if offline and not _weights_may_be_cached(library, model_name, tag):
        raise offline_error  # before building: a ViT-H takes longer to build than to fail
    try:
        with _hub_offline(offline):
            if library == "open_clip":
                return _create_open_clip(model_name, num_classes, tag, checkpoint, image_size, device)
            return _create_timm(model_name, num_classes, tag, checkpoint, image_size, device, wants_weights)
    except PretrainedWeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, network and file errors come in many types
        if not wants_weights:
            raise
        if offline:
            raise offline_error from exc
        raise PretrainedWeightsError(
            f"Could not fetch pretrained weights for {name!r} (tag {tag!r}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} -- pass a local file with --checkpoint PATH "
            "(Python: checkpoint=PATH)"
        ) from exc


HUB_HOST = os.environ.get("FUSED_FT_HUB_HOST", "huggingface.co")  # tests point it at a host that never resolves


def _hub_reachable() -> bool:
    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Offline, huggingface_hub works in its offline mode: weights in its cache still load, and missing
    ones fail at once, where its retries took about a minute, with a line on stderr each, before the
    same error."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def _weights_may_be_cached(library: str, model_name: str, tag: str | None) -> bool:
    """False only when the pretrained weights are certainly in none of the caches the libraries download
    to (huggingface_hub's, torch.hub's, open_clip's ~/.cache/clip); True when they may be, or when the
    library does not say where they come from."""
    try:
        if library == "open_clip":
            import open_clip

            cfg = open_clip.get_pretrained_cfg(model_name, tag) if tag else {}
            repo, url = cfg.get("hf_hub", ""), cfg.get("url", "")
        else:
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(f"{model_name}.{tag}" if tag and "." not in model_name else model_name)
            repo, url = cfg.hf_hub_id or "", cfg.url or ""
    except Exception:  # noqa: BLE001 - an unknown tag or config: let the library report it
        return True
    import huggingface_hub.constants as hub

    candidates = []
    if repo:  # "org/name" or "org/name/file"
        candidates.append(Path(hub.HF_HUB_CACHE) / ("models--" + "--".join(repo.strip("/").split("/")[:2])))
    if url:
        file = Path(urllib.parse.urlparse(url).path).name
        candidates += [Path(torch.hub.get_dir()) / "checkpoints" / file, Path.home() / ".cache" / "clip" / file]
    return not candidates or any(c.exists() for c in candidates)


def _create_open_clip(model_name, num_classes, tag, checkpoint, image_size, device) -> nn.Module:
    open_clip = require("open_clip", f"the open_clip model {model_name!r}")

    kwargs = {"force_image_size": image_size} if image_size else {}
    weights = str(checkpoint) if checkpoint is not None else tag
    logging.disable(logging.ERROR)  # open_clip logs its failures itself; ours is the one line the user sees
    try:
        # built where it will live: open_clip builds on the CPU and moves, which for device="meta" spent
        # 9 s initialising ViT-H's weights only to drop them
        with torch.device(device or "cpu"):
            model = open_clip.create_model(model_name, pretrained=weights, device=device or "cpu",
                                           require_pretrained=weights is not None, **kwargs)
    finally:
        logging.disable(logging.NOTSET)
    return ClipClassifier(model.visual, num_classes)


def _create_timm(model_name, num_classes, tag, checkpoint, image_size, device, wants_weights) -> nn.Module:
    timm = require("timm", f"the timm model {model_name!r}")

    kwargs = {"pretrained_cfg_overlay": {"file": str(checkpoint)}} if checkpoint is not None else {}
    full_name = f"{model_name}.{tag}" if tag and "." not in model_name else model_name
    with torch.device(device or "cpu"):
        if image_size:
            try:  # transformers fix their input size when built; convnets take any size and refuse img_size
                return timm.create_model(full_name, pretrained=wants_weights, num_classes=num_classes,
                                         img_size=image_size, **kwargs)
            except TypeError as exc:
                if "img_size" not in str(exc):
                    raise
        return timm.create_model(full_name, pretrained=wants_weights, num_classes=num_classes, **kwargs)



def check_input_size(model: nn.Module, size: int, name: str) -> None:
    """Put one image of ``size`` through ``model`` (no compute for a model on the meta device): a size
    the model cannot take, such as one smaller than its patch, fails here in one line instead of as a
    traceback in the first training step. Raises ValueError naming the size and the model."""
    param = next(model.parameters())
    x = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
    training = model.training
    model.eval()  # batch norm must not count this image in its running statistics
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, AssertionError) as exc:  # timm asserts a transformer's input size
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise ValueError(f"Invalid image size: {size} for {name} (one image of that size through the model "
                         f"failed: {reason}; build the model for the data's size: image_size=, CLI --image-size)"
                         ) from None
    finally:
        model.train(training)


def input_size(model: nn.Module) -> int:
    """The square input resolution a model was built for (timm's pretrained_cfg, open_clip's image_size)."""
    patch_embed = getattr(model, "patch_embed", None)  # timm transformers: the size they were built for
    if getattr(patch_embed, "img_size", None):  # (their pretrained_cfg keeps the checkpoint's, e.g. 224)
        return int(patch_embed.img_size[-1])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return int(cfg["input_size"][-1])
    visual = getattr(model, "visual", None)
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)
