"""Drop-in behaviour: state_dict both ways, schedulers, GradScaler, closures, groups, zero_grad, pickling."""
import copy
import io

import pytest
import torch

import fused_ft
from fused_ft.testing.specs import OPTIMIZERS
from tests.helpers import assert_params_close, assert_state_close, batches, make_model, train_step, twin, two_groups


@pytest.fixture(autouse=True)
def _auto_means_reference(monkeypatch):
    """These tests check drop-in behaviour bit for bit against torch/timm, so ``auto`` runs the
    reference backend here; the kernel backends' numerics are compared in test_kernels.py."""
    from fused_ft.optim import _dispatch

    monkeypatch.setitem(_dispatch._AUTO_ORDER, "cpu", ("reference",))


MODEL = "vit_tiny_patch16_224"
PLAIN = {name: next(iter(spec.variants.values())) for name, spec in OPTIMIZERS.items()}
EXACT = dict(rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("direction", ["ours->reference", "reference->ours"])
def test_state_dict_round_trip_continues_identically(opt_name, direction):
    spec = OPTIMIZERS[opt_name]
    kwargs = PLAIN[opt_name]
    first_model = make_model(MODEL)
    ours_first = direction == "ours->reference"
    make_first, make_second = (spec.cls, spec.reference) if ours_first else (spec.reference, spec.cls)
    first = make_first(two_groups(first_model, lr=kwargs["lr"] * 0.5), **kwargs)
    data = list(batches(10))
    for x, y in data[:5]:
        train_step(first_model, first, x, y)
    second_model = twin(first_model)
    second = make_second(two_groups(second_model, lr=123.0), **kwargs)  # hyperparameters come from the state dict
    # a deep copy, as torch.save/torch.load would give: load_state_dict keeps (aliases) tensors whose
    # dtype and device already fit, so loading a live state dict would share buffers between the two
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    assert [g["lr"] for g in second.param_groups] == [g["lr"] for g in first.param_groups]
    for x, y in data[5:]:
        train_step(first_model, first, x, y)
        train_step(second_model, second, x, y)
    assert_params_close(first_model, second_model, **EXACT)
    assert_state_close(first, second, **EXACT)


SCHEDULERS = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name,kwargs", [("sgd", dict(lr=0.05, momentum=0.9)), ("adamw", dict(lr=1e-3))])
def test_lr_schedulers_drive_fused_like_torch(scheduler, opt_name, kwargs):
    spec = OPTIMIZERS[opt_name]
    ours_model = make_model(MODEL)
    ref_model = twin(ours_model)
    ours, ref = spec.cls(ours_model.parameters(), **kwargs), spec.reference(ref_model.parameters(), **kwargs)
    sched_ours, sched_ref = SCHEDULERS[scheduler](ours), SCHEDULERS[scheduler](ref)
    for x, y in batches(8):
        train_step(ours_model, ours, x, y)
        train_step(ref_model, ref, x, y)
        sched_ours.step()
        sched_ref.step()
        assert sched_ours.get_last_lr() == sched_ref.get_last_lr()
    assert_params_close(ours_model, ref_model, **EXACT)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_grad_scaler_unscales_and_skips_inf_steps_like_reference(opt_name):
    spec = OPTIMIZERS[opt_name]
    kwargs = PLAIN[opt_name]
    ours_model = make_model(MODEL)
    ref_model = twin(ours_model)
    ours, ref = spec.cls(ours_model.parameters(), **kwargs), spec.reference(ref_model.parameters(), **kwargs)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for i, (x, y) in enumerate(batches(6)):
        for model, opt, scaler in ((ours_model, ours, scalers[0]), (ref_model, ref, scalers[1])):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if i == 3:  # an overflow: the step must be skipped and the scale halved
                next(model.parameters()).grad[0].fill_(float("inf"))
                before = [p.clone() for p in model.parameters()]
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            if i == 3:
                assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9
    assert_params_close(ours_model, ref_model, **EXACT)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_closure_is_called_and_its_loss_returned(opt_name):
    spec = OPTIMIZERS[opt_name]
    ours_model = make_model(MODEL)
    ref_model = twin(ours_model)
    ours = spec.cls(ours_model.parameters(), **PLAIN[opt_name])
    ref = spec.reference(ref_model.parameters(), **PLAIN[opt_name])
    for x, y in batches(3):
        losses = []
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure))
        assert torch.equal(losses[0], losses[1])
    assert_params_close(ours_model, ref_model, **EXACT)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_add_param_group_later_matches_reference(opt_name):
    spec = OPTIMIZERS[opt_name]
    kwargs = PLAIN[opt_name]
    ours_model = make_model(MODEL)
    ref_model = twin(ours_model)
    opts = []
    for model, make in ((ours_model, spec.cls), (ref_model, spec.reference)):
        head = list(model.head.parameters())
        body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
        opts.append((model, make(head, **kwargs), body))
    for i, (x, y) in enumerate(batches(6)):
        for model, opt, body in opts:
            if i == 3:  # unfreeze the body, as torch's add_param_group docs suggest for fine-tuning
                opt.add_param_group({"params": body, "lr": kwargs["lr"] * 0.1})
            train_step(model, opt, x, y)
    assert_params_close(ours_model, ref_model, **EXACT)
    assert_state_close(opts[0][1], opts[1][1], **EXACT)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_follows_torch(set_to_none):
    model = make_model(MODEL)
    opt = fused_ft.SGD(model.parameters(), lr=0.1)
    x, y = next(batches(1))
    train_step(model, opt, x, y)
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_torch_save_and_load_of_optimizer_and_state_dict(opt_name):
    spec = OPTIMIZERS[opt_name]
    model = make_model(MODEL)
    opt = spec.cls(two_groups(model, lr=PLAIN[opt_name]["lr"] * 0.5), **PLAIN[opt_name], backend="reference")
    data = list(batches(6))
    for x, y in data[:3]:
        train_step(model, opt, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    pickled = io.BytesIO()
    torch.save(opt, pickled)
    pickled.seek(0)
    whole = torch.load(pickled, weights_only=False)
    assert type(whole) is spec.cls and whole.backend == "reference"
    assert len(whole.state) == len(opt.state)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # the safe loader must accept our state dicts
    restored_model = make_model(MODEL, seed=5)
    restored_model.load_state_dict(saved["model"])
    restored = spec.cls(two_groups(restored_model), **PLAIN[opt_name], backend="reference")
    restored.load_state_dict(saved["optimizer"])
    for x, y in data[3:]:
        train_step(model, opt, x, y)
        train_step(restored_model, restored, x, y)
    assert_params_close(model, restored_model, **EXACT)
