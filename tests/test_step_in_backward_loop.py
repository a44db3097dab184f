"""step_in_backward beside the rest of the training loop: every combination is correct or refused
before any parameter or state changes.

The first iteration's hooks keep their gradients for step(), which checks the loop around it: a
GradScaler (it sets ``found_inf`` on the optimizer before step()) and any change to the gradients
between backward and step (clipping, unscaling: in-place writes, seen by version counters).

Catches: a scaler that is refused only after the first backward applied scaled gradients (w = -101.4
where torch gives 0.9), a scaler after ``unscale_`` (it passes ``grad_scale=None``) that slips through,
clipping after backward that clips nothing (the weights moved by (-3, -4), torch's by (-0.06, -0.08)),
clipping inside a closure (Lightning's place for it), gradient accumulation in the first iteration.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fused_ft
from fused_ft.testing.specs import OPTIMIZERS

LR = 0.1
# (constructor kwargs) per optimizer: plain settings, each refusal must leave weights and state alone
KWARGS = {"sgd": dict(lr=LR), "adamw": dict(lr=LR), "lars": dict(lr=LR), "lamb": dict(lr=LR, max_grad_norm=None)}


def _setup(name: str, grad=(1.0,), **kwargs):
    w = torch.nn.Parameter(torch.ones(len(grad)))
    opt = OPTIMIZERS[name].cls([w], step_in_backward=True, **{**KWARGS[name], **kwargs})
    g = torch.tensor(grad)
    return w, opt, lambda: (w * g).sum()


def _unchanged(w: torch.Tensor, opt, before: torch.Tensor) -> bool:
    return torch.equal(w.detach(), before) and not opt.state[w]


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler.step", "unscale_-then-step"])
@pytest.mark.parametrize("overflow", [False, True], ids=["finite", "inf"])
@pytest.mark.parametrize("name", list(KWARGS))
def test_grad_scaler_is_refused_before_any_change(name, overflow, unscale_first):
    w, opt, loss = _setup(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = w.detach().clone()
    scaled = scaler.scale(loss() * (float("inf") if overflow else 1.0))
    scaled.backward()
    if unscale_first:
        scaler.unscale_(opt)  # the scaler then passes grad_scale=None, found_inf set
    with pytest.raises(ValueError, match=r"^Invalid use with torch\.amp\.GradScaler: step_in_backward=True applies "
                                         r"gradients during backward, .*; use bf16 autocast \(no scaler\) or "
                                         r"step_in_backward=False$"):
        scaler.step(opt)
    assert _unchanged(w, opt, before)


def test_grad_scaler_after_the_first_step_is_refused_and_says_what_happened():
    """A scaler that appears after the first iteration is not seen before its backward's updates (no value
    says a gradient is scaled): refused at its step(), saying the gradients were applied scaled."""
    w, opt, loss = _setup("sgd")
    loss().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss()).backward()
    with pytest.raises(ValueError, match=r"\(this backward's gradients were applied as they came\)"):
        scaler.step(opt)


@pytest.mark.parametrize("clip", ["norm", "value"])
@pytest.mark.parametrize("name", list(KWARGS))
def test_clipping_after_backward_is_refused_at_the_first_step_before_any_change(name, clip):
    w, opt, loss = _setup(name, grad=(30.0, 40.0))
    before = w.detach().clone()
    loss().backward()
    if clip == "norm":
        torch.nn.utils.clip_grad_norm_([w], 1.0)
    else:
        torch.nn.utils.clip_grad_value_([w], 1.0)
    with pytest.raises(RuntimeError, match=r"^Invalid change to gradients between backward\(\) and step\(\) with "
                                           r"step_in_backward=True: group 0 param 0 \(shape \(2,\)\) .*"
                                           r"use step_in_backward=False to clip or rescale gradients$"):
        opt.step()
    assert _unchanged(w, opt, before)


def test_clipping_without_step_in_backward_is_torchs():
    """The way out the refusal names: the same loop without step_in_backward moves the weights as torch's
    SGD does, (-0.06, -0.08) for gradient (30, 40) clipped to norm 1."""
    w = torch.nn.Parameter(torch.ones(2))
    opt = fused_ft.SGD([w], lr=LR)
    (w * torch.tensor([30.0, 40.0])).sum().backward()
    torch.nn.utils.clip_grad_norm_([w], 1.0)
    opt.step()
    torch.testing.assert_close(w.detach() - 1, torch.tensor([-0.06, -0.08]))


def test_clipping_inside_a_closure_is_refused_before_any_change():
    """Lightning clips inside the closure it passes to step(), after the backward."""
    w, opt, loss = _setup("sgd", grad=(30.0, 40.0), momentum=0.9)
    before = w.detach().clone()

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_([w], 1.0)
        return value

    with pytest.raises(RuntimeError, match=r"^Invalid change to gradients between backward\(\) and step\(\)"):
        opt.step(closure)
    assert _unchanged(w, opt, before)


def test_the_first_iteration_applies_at_step_and_later_ones_in_backward():
    """The loop check's cost: the first iteration holds its gradients until step() (a plain step); from the
    second on, backward applies and frees them. The weights equal torch's SGD throughout."""
    w, opt, loss = _setup("sgd", grad=(30.0, 40.0), momentum=0.9, backend="reference")  # torch's bits
    ref = torch.nn.Parameter(torch.ones(2))
    torch_opt = torch.optim.SGD([ref], lr=LR, momentum=0.9)
    for i in range(3):
        loss().backward()
        assert torch.equal(w.detach(), ref.detach()) == (i == 0)  # later iterations updated in backward
        opt.step()
        (ref * torch.tensor([30.0, 40.0])).sum().backward()
        torch_opt.step()
        torch_opt.zero_grad()
        assert torch.equal(w.detach(), ref.detach()), i


def test_accumulation_in_the_first_iteration_is_refused_and_nothing_is_applied():
    w, opt, loss = _setup("sgd", momentum=0.9)
    before = w.detach().clone()
    loss().backward()
    with pytest.raises(RuntimeError, match=r"^Invalid gradient accumulation with step_in_backward=True: group 0 "
                                           r"param 0 \(shape \(1,\)\) got a second gradient before optimizer"):
        loss().backward()
    opt.step()  # the refused iteration's gradients are dropped, never applied
    assert _unchanged(w, opt, before) and w.grad is None


def _linear(**kwargs):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)  # the bias is the sentinel: the smallest hooked parameter
    opt = fused_ft.SGD(layer.parameters(), lr=LR, momentum=0.9, step_in_backward=True, **kwargs)
    x = torch.randn(4, 3)
    return layer, opt, lambda: layer(x).square().sum()


@pytest.mark.parametrize("where", ["after-backward", "in-a-closure"])
def test_clipping_first_used_later_is_refused_at_its_step(where):
    """After the first iteration only the sentinel's gradient is alive at step(): a clip first used then
    sees it alone (clip_grad_norm_ returned 0 with every gradient freed) and writes it; step() refuses,
    saying that the backward's updates were applied."""
    layer, opt, loss = _linear()
    for _ in range(2):
        loss().backward()
        opt.step()

    def clipped():
        opt.zero_grad()
        value = loss()
        value.backward()
        assert torch.nn.utils.clip_grad_norm_(layer.parameters(), 1e-3) > 0  # the sentinel's norm
        return value

    with pytest.raises(RuntimeError, match=r"^Invalid change to gradients between backward\(\) and step\(\) .*"
                                           r"\(this backward's gradients were applied as they came\)"):
        if where == "in-a-closure":
            opt.step(clipped)
        else:
            clipped()
            opt.step()
    assert layer.weight.grad is None and layer.bias.grad is None  # dropped: the next iteration starts clean


@pytest.mark.parametrize("refusal", ["scaler", "clip"])
def test_after_a_refusal_the_fixed_loop_runs_as_torch(refusal):
    """A refused first iteration leaves nothing behind: not its gradients (the next backward was refused as
    accumulation), not GradScaler's attributes (torch removes them only when step() returns, and every later
    step() was refused as a GradScaler's)."""
    layer, opt, loss = _linear(backend="reference")
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(layer.state_dict())
    torch_opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    with pytest.raises((ValueError, RuntimeError)):
        if refusal == "scaler":
            scaler = torch.amp.GradScaler("cpu")
            scaler.scale(loss()).backward()
            scaler.step(opt)
        else:
            loss().backward()
            torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
            opt.step()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, optimizer in ((layer, opt), (ref, torch_opt)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)


def test_an_assigned_gradient_is_a_change_too():
    w, opt, loss = _setup("sgd", grad=(30.0, 40.0))
    before = w.detach().clone()
    loss().backward()
    w.grad = w.grad.clamp(-1, 1)  # clipping out of place: a new tensor, its version 0
    with pytest.raises(RuntimeError, match=r"^Invalid change to gradients between backward\(\) and step\(\)"):
        opt.step()
    assert _unchanged(w, opt, before)


@pytest.mark.parametrize("how", ["resume", "deepcopy"])
def test_a_resumed_or_copied_run_equals_the_uninterrupted_one_bit_for_bit(how):
    """The resumed run's first iteration is applied by step(), the uninterrupted run's in backward: the
    same buckets in the same order, so stochastic rounding draws the same bits (applied in another
    order or bucketing, the group's bf16_step and the bits differ). Small buckets: several per backward."""
    def run(interrupt_at=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).bfloat16()
        opt = fused_ft.AdamW(model.parameters(), lr=1e-2, step_in_backward=True, bf16_update="stochastic",
                             bf16_seed=7, backend="reference")
        opt.bucket_bytes = 40
        g = torch.Generator().manual_seed(1)
        for i in range(5):
            if i == interrupt_at:
                if how == "deepcopy":
                    model, opt = copy.deepcopy((model, opt))
                else:
                    saved = opt.state_dict()
                    opt = fused_ft.AdamW(model.parameters(), lr=1e-2, step_in_backward=True, backend="reference",
                                         bf16_update="stochastic", bf16_seed=7)
                    opt.bucket_bytes = 40
                    opt.load_state_dict(saved)
            model(torch.randn(3, 6, generator=g).bfloat16()).float().square().mean().backward()
            opt.step()
        return [p.detach() for p in model.parameters()], opt.param_groups[0]["bf16_step"]

    (whole, steps), (interrupted, steps_interrupted) = run(), run(interrupt_at=2)
    assert steps == steps_interrupted and steps > 5  # several buckets per backward
    assert all(torch.equal(a, b) for a, b in zip(whole, interrupted))


def test_a_dropped_optimizer_is_freed_at_once_and_its_hooks_stop():
    """Nothing the optimizer holds may refer back to it (the callbacks it gives autograd and torch.compile
    hold it weakly): a cycle kept a dropped one alive until the next garbage collection, its hooks updating
    the parameters meanwhile (a second memory profile of the same model refused its backward)."""
    import gc
    import weakref

    layer, opt, loss = _linear()
    loss().backward()
    opt.step()
    gone = weakref.ref(opt)
    gc.disable()
    try:
        del opt
        assert gone() is None
    finally:
        gc.enable()
    before = layer.weight.detach().clone()
    loss().backward()
    assert torch.equal(layer.weight, before) and layer.weight.grad is not None  # no hook of the dropped one ran
