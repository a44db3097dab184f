"""Finding and freezing a model's "embedding" layer, as Kumar et al. define it (Sec. 2.2, Appendix A).

- CLIP ViTs: the patch-to-token conv and the layernorm after it (open_clip ``visual.conv1`` +
  ``visual.ln_pre``; timm ``*_clip_*`` ViTs ``patch_embed`` + ``norm_pre``).
- Supervised and DINO ViTs: the patch embedding only (their ``norm_pre`` is an identity). Never the
  cls token or the position embedding.
- ConvNeXt, BiT ResNetV2 and other convnets: the stem and the first stage (``stem_only`` keeps the
  stem alone, the paper's Appendix C ablation). The stem is timm's ``group_matcher()["stem"]``
  pattern, the first stage the first ``feature_info`` module after it.
- Anything else: pass ``names`` (module or parameter name prefixes) or ``pattern`` (a regex).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn

__all__ = ["EmbeddingNotFound", "embedding_params", "freeze_embedding", "POSITION_TOKENS"]

# Parameters that sit with the embedding in timm's "stem" group but are not the embedding layer.
POSITION_TOKENS = re.compile(
    r"(^|\.)(cls_token|reg_token|dist_token|mask_token|pos_embed|class_embedding|positional_embedding)$"
)
_AFTER_EMBED_NORM = re.compile(r"(^|\.)(ln_pre|norm_pre|patch_embed\.norm)\.")


class EmbeddingNotFound(ValueError):
    """No rule finds this model's embedding layer; the message says how to name it."""


def embedding_params(
    model: nn.Module,
    *,
    include_norm: bool = True,
    stem_only: bool = False,
    names: Sequence[str] | None = None,
    pattern: str | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of the model's embedding layer, in the model's order.

    Args:
        model: a timm model, a :class:`fused_ft.vision.models.ClipClassifier`, or any module (with ``names``
            or ``pattern``).
        include_norm: keep the normalization right after the patch embedding (CLIP's ``ln_pre``);
            False gives the paper's "freeze-embed, not layer-norm" variant.
        stem_only: for convnets, the stem without the first stage (Appendix C).
        names: explicit module or parameter names (prefixes), overriding the rules.
        pattern: a regular expression matched (``re.search``) against parameter names, overriding the rules.

    Raises:
        EmbeddingNotFound: no rule applies, or the override matches nothing.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        >>> [n for n, _ in embedding_params(vit)]
        ['patch_embed.proj.weight', 'patch_embed.proj.bias']
    """
    named = list(model.named_parameters())
    if names is not None or pattern is not None:
        found = _override(named, names, pattern)
        what = f"names={list(names)!r}" if names is not None else f"pattern={pattern!r}"
        if not found:
            raise EmbeddingNotFound(f"Invalid {what}: matches no parameter of {type(model).__name__}")
        return found
    prefixes = _rule_prefixes(model, stem_only)
    if prefixes is None:
        raise EmbeddingNotFound(
            f"Cannot find the embedding layer of {type(model).__name__}: no rule for this architecture "
            "(rules cover open_clip CLIP ViTs, timm models with patch_embed, and timm models with a stem). "
            "Name it yourself: embedding_params(model, names=['conv1', 'bn1']) or pattern=r'^stem\\.' "
            "(CLI: --embed-names conv1,bn1 or --embed-pattern '^stem\\.')"
        )
    found = [(n, p) for n, p in named if any(_under(n, prefix) for prefix in prefixes)]
    if not include_norm:
        norms = _norm_param_names(model)
        found = [(n, p) for n, p in found if n not in norms]
    return found


def freeze_embedding(model: nn.Module, **options) -> list[str]:
    """Set ``requires_grad=False`` on the embedding layer (see :func:`embedding_params`); return its names.

    A frozen parameter then gets no gradient (no memory for it) and, in a fused_ft optimizer, belongs
    in a ``frozen=True`` group; :func:`fused_ft.create_optimizer` does both.
    """
    found = embedding_params(model, **options)
    for _, p in found:
        p.requires_grad_(False)
    return [n for n, _ in found]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _override(named, names: Iterable[str] | None, pattern: str | None):
    if names is not None:
        names = [n.strip() for n in names if n.strip()]
        return [(n, p) for n, p in named if any(_under(n, prefix) for prefix in names)]
    regex = re.compile(pattern)
    return [(n, p) for n, p in named if regex.search(n)]


def _has_params(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def _rule_prefixes(model: nn.Module, stem_only: bool) -> list[str] | None:
    """Module-name prefixes of the embedding, or None when no rule knows the architecture."""
    # open_clip's VisionTransformer, wherever it sits (ClipClassifier puts it at "visual")
    for prefix, module in model.named_modules():
        if all(hasattr(module, a) for a in ("conv1", "ln_pre", "transformer")):
            dot = prefix + "." if prefix else ""
            return [dot + "conv1", dot + "ln_pre"]
    patch_embed = getattr(model, "patch_embed", None)
    if isinstance(patch_embed, nn.Module):
        # CLIP ViTs in timm have a pre-norm with parameters; supervised/DINO ViTs an Identity
        return ["patch_embed"] + (["norm_pre"] if _has_params(getattr(model, "norm_pre", None)) else [])
    return _stem_and_first_stage(model, stem_only)


def _stem_and_first_stage(model: nn.Module, stem_only: bool) -> list[str] | None:
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return None
    stem = matcher().get("stem")
    if not isinstance(stem, str):
        return None
    regex = re.compile(stem)
    named = [n for n, _ in model.named_parameters()]
    stem_names = [n for n in named if regex.match(n) and not POSITION_TOKENS.search(n)]
    if not stem_names:
        return None
    if stem_only:
        return stem_names
    for info in getattr(model, "feature_info", []) or []:
        module = info.get("module") if isinstance(info, dict) else None
        if not module:
            continue
        members = [n for n in named if _under(n, module)]
        if members and not set(members) <= set(stem_names):
            return stem_names + [module]
    return stem_names


def _norm_param_names(model: nn.Module) -> set[str]:
    """The normalization right after the patch embedding (CLIP's ln_pre, timm's norm_pre, Swin's patch_embed.norm)."""
    return {n for n, _ in model.named_parameters() if _AFTER_EMBED_NORM.search(n)}
