"""The method factory: the paper's methods by name, gradual unfreezing and LP-FT."""
from __future__ import annotations

import math

import pytest
import torch

import fused_ft
from fused_ft.vision.embedding import embedding_params
from fused_ft.vision.layers import head_params, model_layers
from fused_ft.vision.methods import ADAMW_LRS, METHODS, SGD_LRS, create_optimizer
from fused_ft.vision.unfreeze import GradualUnfreeze, trainable_layers, unfreeze_lr_factor
from tests.helpers import batches, make_model, train_step

ISSUE_NAMES = ["sgd", "sgd-nomom", "sgd-wd", "adamw", "sgd-freeze-embed", "sgd-freeze-embed-nomom",
               "sgd-freeze-embed-not-ln", "sgd-embed-lr-0.2x", "adamw-freeze-embed", "lars", "lamb",
               "linear-probe", "gradual-unfreeze"]


def test_methods_registry_is_the_papers_list():
    assert list(METHODS) == ISSUE_NAMES
    assert all(m.description for m in METHODS.values())
    assert SGD_LRS == (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2) and ADAMW_LRS == (3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4)


@pytest.mark.parametrize("name", ISSUE_NAMES)
def test_every_method_builds_and_steps(name):
    model = make_model("vit_tiny_patch16_224")
    optimizer = create_optimizer(model, name, lr=1e-3)
    frozen = {id(p) for g in optimizer.param_groups if g["frozen"] for p in g["params"]}
    assert all(p.requires_grad == (id(p) not in frozen) for p in model.parameters())
    before = {id(p): p.detach().clone() for p in model.parameters()}
    x, y = next(batches(1))
    train_step(model, optimizer, x, y)
    for p in model.parameters():
        if id(p) in frozen:
            assert torch.equal(p, before[id(p)]) and p.grad is None and p not in optimizer.state


def test_paper_defaults():
    model = make_model("vit_tiny_patch16_224")
    sgd = create_optimizer(model, "sgd", lr=1e-2)
    assert isinstance(sgd, fused_ft.SGD)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 0 and not sgd.defaults["nesterov"]
    adamw = create_optimizer(model, "adamw")
    assert isinstance(adamw, fused_ft.AdamW)
    assert (adamw.defaults["lr"], adamw.defaults["weight_decay"], adamw.defaults["betas"], adamw.defaults["eps"]) == (
        1e-5, 0.01, (0.9, 0.999), 1e-8)
    assert create_optimizer(model, "sgd-wd").defaults["weight_decay"] == 0.01
    assert create_optimizer(model, "sgd-freeze-embed-nomom").defaults["momentum"] == 0.0
    assert create_optimizer(model, "sgd", momentum=0.5).defaults["momentum"] == 0.5  # overrides win


def test_embed_lr_scale_and_lp_ft_divisor():
    model = make_model("vit_tiny_patch16_224")
    opt = create_optimizer(model, "sgd-embed-lr-0.2x", lr=1e-2)
    embed = {id(p) for _, p in embedding_params(model)}
    (group,) = [g for g in opt.param_groups if {id(p) for p in g["params"]} == embed]
    assert group["lr"] == pytest.approx(2e-3) and not group["frozen"]
    assert create_optimizer(model, "sgd-freeze-embed", lr=1e-2, after_linear_probe=True).defaults["lr"] == 1e-3


def test_linear_probe_then_finetune():
    model = make_model("vit_tiny_patch16_224")
    probe = create_optimizer(model, "linear-probe", lr=0.1)
    head = {id(p) for _, p in head_params(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == head
    x, y = next(batches(1))
    train_step(model, probe, x, y)
    finetune = create_optimizer(model, "sgd-freeze-embed", lr=1e-2, after_linear_probe=True)
    embed = {id(p) for _, p in embedding_params(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.parameters()} - embed
    assert finetune.defaults["lr"] == pytest.approx(1e-3)


def test_bad_inputs_name_the_argument_and_change_nothing():
    model = make_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"Invalid method: 'sgd-freeze' \(valid: sgd, sgd-nomom, .*gradual-unfreeze\)"):
        create_optimizer(model, "sgd-freeze")
    with pytest.raises(ValueError, match=r"Invalid lr: -0\.1"):
        create_optimizer(model, "sgd", lr=-0.1)
    with pytest.raises(ValueError, match=r"Invalid momentum: -1"):
        create_optimizer(model, "sgd-freeze-embed", momentum=-1)
    assert all(p.requires_grad for p in model.parameters())  # the failed freeze left the model alone


def test_gradual_unfreeze_schedule_closed_form():
    assert unfreeze_lr_factor(0, 10) == pytest.approx(math.exp(3.73))
    assert unfreeze_lr_factor(9, 10) == 1.0
    assert unfreeze_lr_factor(3, 7) == pytest.approx(math.exp(3.73 * 0.5))
    assert unfreeze_lr_factor(0, 1) == 1.0
    assert [trainable_layers(t, 4, 14) for t in range(4)] == [4, 7, 11, 14]


def test_gradual_unfreeze_trains_from_the_top_and_resumes():
    model = make_model("vit_tiny_patch16_224")
    layers = model_layers(model)
    opt = create_optimizer(model, "gradual-unfreeze", lr=1e-3)
    assert [g["layer"] for g in opt.param_groups] == [layer.name for layer in layers]
    sched = GradualUnfreeze(opt, epochs=4)
    k = trainable_layers(0, 4, len(layers))
    assert [g["frozen"] for g in opt.param_groups] == [True] * (len(layers) - k) + [False] * k
    assert opt.param_groups[-1]["lr"] == pytest.approx(1e-3 * math.exp(3.73))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(batches(1))
    train_step(model, opt, x, y)
    trainable = {id(p) for g in opt.param_groups if not g["frozen"] for p in g["params"]}
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) == (id(p) not in trainable) or p.grad is None
    sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    k1 = sum(not g["frozen"] for g in opt.param_groups)
    # a fresh model, optimizer and scheduler resume at epoch 1 with the same frozen layers and LRs
    model2 = make_model("vit_tiny_patch16_224")
    opt2 = create_optimizer(model2, "gradual-unfreeze", lr=1e-3)
    sched2 = GradualUnfreeze(opt2, epochs=4)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sum(p.requires_grad for p in model2.parameters()) == sum(p.requires_grad for p in model.parameters())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert k1 == trainable_layers(1, 4, len(layers))
    for _ in range(2):
        sched.step()
    assert all(not g["frozen"] for g in opt.param_groups) and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"Invalid epochs: 0"):
        GradualUnfreeze(create_optimizer(model, "gradual-unfreeze"), epochs=0)
