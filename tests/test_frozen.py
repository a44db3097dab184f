"""Frozen param groups: skipped, stateless, gradient-free; unfrozen later with lazily created state."""
import pytest
import torch

import fused_ft
from fused_ft.testing.specs import OPTIMIZERS
from fused_ft.memory import optimizer_state_bytes
from tests.helpers import assert_params_close, batches, make_model, train_step, twin


@pytest.fixture(autouse=True)
def _auto_means_reference(monkeypatch):
    """These tests check drop-in behaviour bit for bit against torch/timm, so ``auto`` runs the
    reference backend here; the kernel backends' numerics are compared in test_kernels.py."""
    from fused_ft.optim import _dispatch

    monkeypatch.setitem(_dispatch._AUTO_ORDER, "cpu", ("reference",))


MODEL = "vit_tiny_patch16_224"


def _frozen_embed_groups(model):
    embed = list(model.patch_embed.parameters())
    for p in embed:
        p.requires_grad_(False)
    rest = [p for n, p in model.named_parameters() if not n.startswith("patch_embed.")]
    return [{"params": rest}, {"params": embed, "frozen": True}], embed, rest


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_frozen_group_is_skipped_stateless_and_matches_reference_on_the_rest(opt_name):
    spec = OPTIMIZERS[opt_name]
    kwargs = next(iter(spec.variants.values()))
    model = make_model(MODEL)
    ref_model = twin(model)
    groups, embed, rest = _frozen_embed_groups(model)
    opt = spec.cls(groups, **kwargs)
    ref_groups, _, _ = _frozen_embed_groups(ref_model)
    ref = spec.reference([ref_groups[0]], **kwargs)  # the reference simply never sees the embedding
    before = [p.clone() for p in embed]
    for x, y in batches(5):
        train_step(model, opt, x, y)
        train_step(ref_model, ref, x, y)
    assert all(torch.equal(b, p) for b, p in zip(before, embed))
    assert all(p.grad is None for p in embed)
    assert not any(p in opt.state for p in embed)
    assert "step" not in opt.param_groups[1]  # not even LAMB's group step counter
    assert_params_close(model, ref_model, rtol=1e-6, atol=1e-8)
    assert optimizer_state_bytes(opt) == optimizer_state_bytes(ref)


def test_frozen_group_ignores_gradients_that_are_present():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = fused_ft.AdamW([{"params": [a]}, {"params": [b], "frozen": True}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    b_before = b.clone()
    opt.step()
    assert torch.equal(b, b_before) and b not in opt.state and a in opt.state


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_unfreezing_creates_state_lazily_like_a_new_param_group(opt_name):
    """Frozen for 3 steps then unfrozen == the reference with that group added at step 3."""
    spec = OPTIMIZERS[opt_name]
    kwargs = next(iter(spec.variants.values()))
    model = make_model(MODEL)
    ref_model = twin(model)
    groups, embed, _ = _frozen_embed_groups(model)
    opt = spec.cls(groups, **kwargs)
    ref_groups, ref_embed, _ = _frozen_embed_groups(ref_model)
    ref = spec.reference([ref_groups[0]], **kwargs)
    for i, (x, y) in enumerate(batches(6)):
        if i == 3:
            opt.param_groups[1]["frozen"] = False
            for p in embed + ref_embed:
                p.requires_grad_(True)
            ref.add_param_group({"params": ref_embed})
        train_step(model, opt, x, y)
        train_step(ref_model, ref, x, y)
    assert all(p in opt.state for p in embed) or opt_name == "sgd" and kwargs.get("momentum", 0) == 0
    assert_params_close(model, ref_model, rtol=1e-6, atol=1e-8)


def test_params_without_grad_are_skipped_as_in_torch():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = fused_ft.SGD([a, b], lr=0.1, momentum=0.9)
    a.grad = torch.ones(3)
    a_before, b_before = a.detach().clone(), b.detach().clone()
    opt.step()
    assert torch.equal(b, b_before) and b not in opt.state
    assert torch.allclose(a, a_before - 0.1)  # first step: buffer = grad, so a moves by lr * grad
