"""Drop-in behaviour on the default backend (on CPU: the C++ kernels) against torch.optim and timm.

test_interop.py and test_frozen.py check the same behaviours bit for bit on the reference backend;
here the backend is ``auto``, as users get it, and the comparison allows kernel rounding (the
registry's tolerances, relative to each tensor's scale). Gradients are set by hand and shared, so a
difference is the optimizer's, not the chaotic growth of rounding through separate forward passes.

Catches: a kernel backend that ignores momentum or moments loaded from a state dict (or one that
torch cannot load), that reads the learning rate once instead of each step (schedulers), that
updates on a step GradScaler skips, that mishandles closures, that never updates an unfrozen group
or updates a frozen one whose parameters still take gradients.
"""
import copy

import pytest
import torch

from fused_ft.testing.specs import OPTIMIZERS
from tests.helpers import assert_close_tensorwise

PLAIN = {name: next(iter(spec.variants.values())) for name, spec in OPTIMIZERS.items()}
SHAPES = [(33,), (7, 5), (16, 16), ()]


@pytest.fixture(autouse=True)
def _default_backend_is_the_cpu_kernels():
    from fused_ft import available_backends

    assert available_backends("cpu")[0] == "cpu", "these tests are about the C++ kernels, which did not build"


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def _grads(step, scale=1.0):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * scale for s in SHAPES]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _assert_close(opt_name, ours, ref, ours_opt=None, ref_opt=None):
    tol = OPTIMIZERS[opt_name].reference_rtol
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close_tensorwise(a, b, rtol=tol, what=f"param {i}")
    if ours_opt is not None:
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert ours_opt.state[a].keys() == ref_opt.state[b].keys(), i
            for key, value in ref_opt.state[b].items():
                assert_close_tensorwise(ours_opt.state[a][key], value, rtol=tol, what=f"param {i} state[{key!r}]")


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("direction", ["ours->reference", "reference->ours"])
def test_state_dict_both_ways_then_continue(opt_name, direction):
    spec = OPTIMIZERS[opt_name]
    first_params = _params()
    first = (spec.cls if direction == "ours->reference" else spec.reference)(first_params, **PLAIN[opt_name])
    for step in range(3):
        _set_grads(first_params, _grads(step))
        first.step()
    second_params = [p.detach().clone().requires_grad_() for p in first_params]
    second = (spec.reference if direction == "ours->reference" else spec.cls)(second_params, **PLAIN[opt_name])
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for step in range(3, 6):
        _set_grads(first_params, _grads(step))
        _set_grads(second_params, _grads(step))
        first.step()
        second.step()
    ours, ref = (first_params, second_params) if direction == "ours->reference" else (second_params, first_params)
    ours_opt, ref_opt = (first, second) if direction == "ours->reference" else (second, first)
    _assert_close(opt_name, ours, ref, ours_opt, ref_opt)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_schedulers_grad_scaler_and_closures(opt_name):
    """A cosine schedule throughout; steps 0-3 through GradScaler, with an inf gradient at step 2 that
    it must skip (it unscales the others); steps 4-5 through a closure, whose loss step() returns."""
    spec = OPTIMIZERS[opt_name]
    params = {who: _params() for who in ("ours", "ref")}
    opts = {"ours": spec.cls(params["ours"], **PLAIN[opt_name]),
            "ref": spec.reference(params["ref"], **PLAIN[opt_name])}
    schedules = {who: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6) for who, opt in opts.items()}
    scalers = {who: torch.amp.GradScaler("cpu", init_scale=64.0) for who in opts}
    lrs, losses = {who: [] for who in opts}, {who: [] for who in opts}
    for step in range(6):
        for who, opt in opts.items():
            if step < 4:
                scalers[who].scale(torch.ones(()))  # creates the scale on first use
                grads = _grads(step, scale=scalers[who].get_scale())
                if step == 2:
                    grads[1][0, 0] = float("inf")
                _set_grads(params[who], grads)
                scalers[who].step(opt)
                scalers[who].update()
            else:
                def closure(params=params[who], grads=_grads(step)):
                    _set_grads(params, grads)
                    return torch.tensor(float(step))

                losses[who].append(opt.step(closure))
            schedules[who].step()
            lrs[who].append(schedules[who].get_last_lr())
    assert lrs["ours"] == lrs["ref"] and losses["ours"] == losses["ref"] == [torch.tensor(4.0), torch.tensor(5.0)]
    assert scalers["ours"].get_scale() == scalers["ref"].get_scale() < 64.0  # the inf step was seen and skipped
    _assert_close(opt_name, params["ours"], params["ref"], opts["ours"], opts["ref"])


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_frozen_group_with_gradients_then_unfrozen(opt_name):
    """Group 1 is frozen while its parameters still take gradients (untouched, no state), then
    unfrozen at step 3: from there it matches a torch optimizer that got it by add_param_group."""
    spec = OPTIMIZERS[opt_name]
    ours_params, ref_params = _params(), _params()
    ours = spec.cls([{"params": ours_params[:2]}, {"params": ours_params[2:], "frozen": True}], **PLAIN[opt_name])
    ref = spec.reference(ref_params[:2], **PLAIN[opt_name])
    frozen_start = [p.detach().clone() for p in ours_params[2:]]
    for step in range(6):
        if step == 3:
            ours.param_groups[1]["frozen"] = False
            ref.add_param_group({"params": ref_params[2:]})
        _set_grads(ours_params, _grads(step))
        _set_grads(ref_params, _grads(step))
        ours.step()
        ref.step()
        if step < 3:
            assert all(torch.equal(a, b) for a, b in zip(frozen_start, ours_params[2:]))
            assert not any(p in ours.state for p in ours_params[2:])
    _assert_close(opt_name, ours_params, ref_params, ours, ref)
