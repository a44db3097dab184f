"""step_in_backward (issue 6): the same trajectories as a normal step, and clear refusals."""
from __future__ import annotations

import pytest
import torch

import fused_ft
from fused_ft.specs import OPTIMIZERS
from tests.helpers import batches, make_model, train_step, twin

CASES = {"sgd": dict(lr=0.05, momentum=0.9), "sgd-nomom": dict(lr=0.05), "adamw": dict(lr=1e-3),
         "lars": dict(lr=0.5, momentum=0.9, weight_decay=1e-4), "lamb": dict(lr=1e-3, max_grad_norm=None)}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_equals_normal_step(case, backend):
    cls = OPTIMIZERS[case.split("-")[0]].cls
    model = make_model("vit_tiny_patch16_224")
    model.patch_embed.requires_grad_(False)  # frozen, as create_optimizer does
    other = twin(model)
    groups = lambda m: [{"params": [p for n, p in m.named_parameters() if not n.startswith("patch_embed")]},  # noqa: E731
                        {"params": list(m.patch_embed.parameters()), "frozen": True}]
    normal = cls(groups(model), backend=backend, **CASES[case])
    inside = cls(groups(other), backend=backend, step_in_backward=True, **CASES[case])
    scheduler = torch.optim.lr_scheduler.StepLR(inside, step_size=1, gamma=0.5)
    scheduler_ref = torch.optim.lr_scheduler.StepLR(normal, step_size=1, gamma=0.5)
    for x, y in batches(3):
        train_step(model, normal, x, y)
        train_step(other, inside, x, y)
        scheduler.step()
        scheduler_ref.step()
        assert all(p.grad is None for p in other.parameters())  # every gradient was freed in backward
    for (n, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(model.parameters(), other.parameters()):
        for key, value in normal.state[a].items():
            assert torch.equal(value, inside.state[b][key])


def test_refusals():
    model = make_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"Invalid step_in_backward=True with max_grad_norm=1\.0"):
        fused_ft.LAMB(model.parameters(), step_in_backward=True)
    with pytest.raises(TypeError, match=r"Invalid step_in_backward: 'yes'"):
        fused_ft.SGD(model.parameters(), step_in_backward="yes")
    opt = fused_ft.SGD(model.parameters(), lr=0.1, step_in_backward=True)
    with pytest.raises(ValueError, match=r"Invalid closure: step_in_backward=True"):
        opt.step(lambda: torch.tensor(0.0))
    scaler = torch.amp.GradScaler("cpu")
    x, y = next(batches(1))
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError, match=r"Invalid use with torch.amp.GradScaler"):
        scaler.step(opt)


def test_parameters_unfrozen_later_update_and_dropped_optimizers_stop():
    model = make_model("vit_tiny_patch16_224")
    probe = fused_ft.create_optimizer(model, "linear-probe", lr=0.1, step_in_backward=True)
    x, y = next(batches(1))
    train_step(model, probe, x, y)
    del probe  # LP-FT: the probe's optimizer is gone; its hooks must not touch the head any more
    finetune = fused_ft.create_optimizer(model, "sgd-freeze-embed", lr=0.05, step_in_backward=True)
    reference = twin(model)
    normal = fused_ft.create_optimizer(reference, "sgd-freeze-embed", lr=0.05)
    for x, y in batches(2):
        train_step(model, finetune, x, y)
        train_step(reference, normal, x, y)
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), n  # blocks unfrozen after the probe were updated, the head only once per step
