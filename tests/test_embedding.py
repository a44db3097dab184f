"""Freeze-embed: the embedding finder on the paper's models, and what freezing does to a step."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_ft
from fused_ft.vision.embedding import EmbeddingNotFound, embedding_params
from fused_ft.vision.models import ClipClassifier, create_model
from tests.helpers import batches, make_model, train_step

# The paper's seven models (Appendix A "Embedding layer") built on the meta device: real parameter
# lists, no memory, no download. Expected: the frozen names (prefixes) and the frozen fraction range.
PAPER_MODELS = {
    "clip-vit-b16": (["visual.conv1", "visual.ln_pre"], (0.0068, 0.0070)),
    "clip-vit-l14": (["visual.conv1", "visual.ln_pre"], (0.0019, 0.0021)),
    "timm-clip-vit-b16": (["patch_embed", "norm_pre"], (0.0068, 0.0070)),
    "timm-clip-vit-l14": (["patch_embed", "norm_pre"], (0.0019, 0.0021)),
    "vit-b16": (["patch_embed"], (0.0068, 0.0070)),
    "dino-vit-b16": (["patch_embed"], (0.0068, 0.0070)),
    "convnext-b": (["stem", "stages.0"], (0.0047, 0.0050)),
    "bit-resnet50": (["stem", "stages.0"], (0.0094, 0.0096)),
    "bit-resnet101": (["stem", "stages.0"], (0.0052, 0.0054)),
}


def _prefixes_cover(names, prefixes):
    return all(any(n == p or n.startswith(p + ".") for p in prefixes) for n in names)


@pytest.mark.parametrize("alias", list(PAPER_MODELS))
def test_paper_models_embedding(alias):
    prefixes, (low, high) = PAPER_MODELS[alias]
    model = create_model(alias, num_classes=10, device="meta")
    found = embedding_params(model)
    names = [n for n, _ in found]
    assert _prefixes_cover(names, prefixes), names
    for p in prefixes:  # every named part is there, completely
        expected = [n for n, _ in model.named_parameters() if n == p or n.startswith(p + ".")]
        assert expected and set(expected) <= set(names), p
    assert not any(k in n for n in names for k in ("cls_token", "pos_embed", "class_embedding", "positional"))
    fraction = sum(p.numel() for _, p in found) / sum(p.numel() for p in model.parameters())
    assert low <= fraction <= high, f"{alias}: frozen fraction {fraction:.5f}"


def test_convnext_stem_only_and_clip_not_ln():
    convnext = create_model("convnext-b", num_classes=10, device="meta")
    stem = [n for n, _ in embedding_params(convnext, stem_only=True)]
    assert stem == ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"]
    assert sum(p.numel() for n, p in convnext.named_parameters() if n.startswith("stem.0")) == 4 * 4 * 3 * 128 + 128
    clip = create_model("clip-vit-b16", num_classes=10, device="meta")
    assert [n for n, _ in embedding_params(clip, include_norm=False)] == ["visual.conv1.weight"]


def test_override_by_names_and_pattern_and_clear_errors():
    model = make_model("resnet10t")
    by_names = [n for n, _ in embedding_params(model, names=["conv1.0"])]
    assert by_names == ["conv1.0.weight"]
    by_regex = [n for n, _ in embedding_params(model, pattern=r"^conv1\.[01]\.")]
    assert by_regex == ["conv1.0.weight", "conv1.1.weight", "conv1.1.bias"]
    with pytest.raises(EmbeddingNotFound, match=r"Invalid pattern='\^nothing': matches no parameter"):
        embedding_params(model, pattern="^nothing")

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    with pytest.raises(EmbeddingNotFound, match=r"Cannot find the embedding layer of Custom.*names=.*--embed-names"):
        embedding_params(Custom())


def _tiny_clip() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                               output_dim=16)
    return ClipClassifier(visual, num_classes=5)


@pytest.mark.parametrize("build", [lambda: make_model("vit_tiny_patch16_224"), lambda: make_model("resnet10t"),
                                   _tiny_clip], ids=["timm-vit", "timm-resnet", "open_clip-vit"])
def test_freeze_embed_step(build):
    model = build()
    optimizer = fused_ft.create_optimizer(model, "sgd-freeze-embed", lr=0.05)
    frozen = {n for n, _ in embedding_params(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for x, y in batches(2):
        train_step(model, optimizer, x, y)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), f"{n} moved"
            assert p.grad is None and not p.requires_grad, n
            assert p not in optimizer.state, n
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p, before[n]), f"{n} did not move"
            assert "momentum_buffer" in optimizer.state[p], n
    frozen_groups = [g for g in optimizer.param_groups if g["frozen"]]
    assert len(frozen_groups) == 1 and {id(p) for p in frozen_groups[0]["params"]} == {
        id(p) for n, p in model.named_parameters() if n in frozen}


def test_freeze_embedding_function():
    model = make_model("vit_tiny_patch16_224")
    names = fused_ft.freeze_embedding(model)
    assert names == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == names


def test_create_model_checkpoint_roundtrip(tmp_path):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_model("vit_tiny_patch16_224", num_classes=5, image_size=32, checkpoint=path)
    # the backbone comes from the file; the head is new, as in any fine-tuning from pretrained weights
    for (n, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b) or n.startswith("head."), n
    assert not torch.equal(source.head.weight, loaded.head.weight)
    with pytest.raises(fused_ft.vision.models.PretrainedWeightsError,
                       match=r"Invalid checkpoint: '.*missing.pth' is not a file"):
        create_model("vit_tiny_patch16_224", num_classes=5, checkpoint=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"Invalid model: 'no_such_model'.*aliases: clip-vit-b16"):
        create_model("no_such_model", num_classes=5)
