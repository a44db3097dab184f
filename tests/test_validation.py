"""Bad input: a clear ValueError/TypeError naming the argument and value, and nothing half-changed."""
import copy

import pytest
import torch

import fused_ft
from fused_ft.testing.specs import OPTIMIZERS


def _params(n=3):
    torch.manual_seed(0)
    return [torch.randn(4, 3, requires_grad=True) for _ in range(n)]


INVALID = [
    pytest.param(name, kwargs, exc, pattern, id=f"{name}-{pattern[:30]}")
    for name, spec in OPTIMIZERS.items()
    for kwargs, exc, pattern in spec.invalid
]


@pytest.mark.parametrize("opt_name,kwargs,exc,pattern", INVALID)
def test_constructor_refuses_bad_hyperparameters(opt_name, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        OPTIMIZERS[opt_name].cls(_params(), **kwargs)


# Inputs torch.optim also refuses: fused_ft raises torch's exception type. (torch.optim accepts some
# inputs fused_ft refuses, e.g. lr=nan or a tensor eps; timm's checks raise by accident, e.g. a bool
# test of a 2-element tensor, so the timm optimizers are held to their registry entries only.)
TORCH_REFUSED = [(name, kwargs) for name, kwargs, *_ in (case.values for case in INVALID)
                 if name in ("sgd", "adamw") and "backend" not in kwargs] + [
    ("adamw", dict(betas=(0.9, torch.tensor(0.99)))), ("adamw", dict(betas=0.9)),
]  # betas=(0.9,): torch fails indexing it (IndexError); fused_ft says ValueError, as for any bad length


@pytest.mark.parametrize("opt_name,kwargs", TORCH_REFUSED, ids=[f"{n}-{k}" for n, k in TORCH_REFUSED])
def test_refusals_raise_torchs_exception_type(opt_name, kwargs):
    spec = OPTIMIZERS[opt_name]
    try:
        spec.reference(_params(), **kwargs)
    except Exception as exc:
        torch_type = type(exc)
    else:
        return  # torch accepts it; fused_ft's own, stricter check (its registry entry) stands
    with pytest.raises(torch_type):
        spec.cls(_params(), **kwargs)


# backend is an optimizer-level argument, not a group option
GROUP_INVALID = [case for case in INVALID if "backend" not in case.values[1]]


@pytest.mark.parametrize("opt_name,kwargs,exc,pattern", GROUP_INVALID)
def test_param_group_overrides_are_checked_too(opt_name, kwargs, exc, pattern):
    a, b = _params(2)
    opt = OPTIMIZERS[opt_name].cls([a])
    with pytest.raises(exc, match=pattern):
        opt.add_param_group({"params": [b], **kwargs})
    assert len(opt.param_groups) == 1  # nothing half-added


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_bad_params_are_refused(opt_name):
    cls = OPTIMIZERS[opt_name].cls
    a, b = _params(2)
    with pytest.raises(ValueError, match=r"Invalid params: empty parameter list"):
        cls([])
    with pytest.raises(ValueError, match=r"Invalid params: group 1 item 0 .*appears in more than one place"):
        cls([{"params": [a, b]}, {"params": [b]}])
    with pytest.raises(ValueError, match=r"Invalid params: group 0 item 1 .*appears in more than one place"):
        cls([a, a])
    with pytest.raises(TypeError, match=r"Invalid params: group 0 item 1 has dtype torch.int64"):
        cls([a, torch.zeros(3, dtype=torch.long)])
    with pytest.raises(TypeError, match=r"Invalid params: a single Tensor"):
        cls(a)
    with pytest.raises(TypeError, match=r"Invalid frozen: 'yes'"):
        cls([{"params": [a], "frozen": "yes"}])


def _snapshot(opt, params):
    return copy.deepcopy(([p.detach().clone() for p in params], opt.state_dict()))


def _assert_unchanged(snapshot, opt, params):
    old_params, old_state = snapshot
    assert all(torch.equal(o, p) for o, p in zip(old_params, params))
    new_state = opt.state_dict()
    assert old_state["state"].keys() == new_state["state"].keys()
    for k in old_state["state"]:
        for key, value in old_state["state"][k].items():
            assert torch.equal(value, new_state["state"][k][key]), (k, key)
    for g_old, g_new in zip(old_state["param_groups"], new_state["param_groups"]):
        assert {k: v for k, v in g_old.items() if not torch.is_tensor(v)} == \
            {k: v for k, v in g_new.items() if not torch.is_tensor(v)}
        assert all(torch.equal(v, g_new[k]) for k, v in g_old.items() if torch.is_tensor(v))


def _with_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("fault", ["sparse-grad", "string-hyperparameter-later", "negative-lr-later",
                                   "bad-backend-later"])
def test_failed_step_changes_nothing(opt_name, fault):
    spec = OPTIMIZERS[opt_name]
    params = _params(4)
    opt = spec.cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], **next(iter(spec.variants.values())))
    _with_grads(params)
    opt.step()  # state exists now: the failing step must leave it alone too
    _with_grads(params)
    # the fault sits in the *second* group, so a naive step would already have updated the first
    if fault == "sparse-grad":
        params[3].grad = torch.randn(4, 3).to_sparse()
        expected = (ValueError, r"Invalid grad: group 1 param 1 .*sparse gradient")
    elif fault == "string-hyperparameter-later":
        opt.param_groups[1]["eps" if "eps" in opt.defaults else "momentum"] = "0.1"
        expected = (TypeError, r"Invalid (eps|momentum): '0\.1'")
    elif fault == "negative-lr-later":
        opt.param_groups[1]["lr"] = -0.5
        expected = (ValueError, r"Invalid lr: -0\.5")
    else:  # group 0 plans on the reference backend; group 1 demands a fused one
        opt.backend = "reference"
        opt.param_groups[1]["fused"] = True
        expected = (ValueError, r"Invalid fused=True with backend='reference'")
    snapshot = _snapshot(opt, params)
    with pytest.raises(expected[0], match=expected[1]):
        opt.step()
    _assert_unchanged(snapshot, opt, params)


def test_backend_conflicts_are_refused_at_construction(monkeypatch):
    """What step() would refuse is refused when the parameters' devices are known: fused=True with
    the reference backend (both named), a backend that cannot run on the parameters' device, and
    triton on a CUDA device of a machine without CUDA."""
    with pytest.raises(ValueError, match=r"Invalid fused=True with backend='reference' .*backend='auto'"):
        fused_ft.SGD(_params(), lr=0.1, fused=True, backend="reference")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(fused_ft.BackendUnavailableError,
                       match=r"'triton' needs CUDA tensors, but the parameters are on cpu"):
        fused_ft.SGD(_params(), lr=0.1, backend="triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "triton" not in fused_ft.available_backends("cuda")
    with pytest.raises(fused_ft.BackendUnavailableError, match=r"needs a CUDA device, and torch sees none"):
        fused_ft.optim._dispatch.resolve("triton", "sgd", torch.device("cuda"), {})


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match=r"Invalid backend: 'fast' \(choose from auto, reference, triton, cpu\)"):
        fused_ft.AdamW(_params(), backend="fast")


def test_bad_values_in_tensor_lr_and_nan_are_named():
    with pytest.raises(ValueError, match=r"Invalid lr: nan"):
        fused_ft.SGD(_params(), lr=float("nan"))
    with pytest.raises(ValueError, match=r"Invalid lr: tensor\(-0\.1000\)"):
        fused_ft.SGD(_params(), lr=torch.tensor(-0.1))


def test_hyperparameters_changed_in_place_after_a_step_are_caught():
    """step() re-checks a group only when its hyperparameters changed since they last passed; a
    list or tensor changed in place is a change too."""
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.ones(3)
    lr = torch.tensor(0.1)
    opt = fused_ft.AdamW([{"params": [p], "betas": [0.9, 0.99], "lr": lr}])
    opt.step()
    opt.param_groups[0]["betas"][0] = 1.5
    with pytest.raises(ValueError, match=r"Invalid betas\[0\]: 1\.5"):
        opt.step()
    opt.param_groups[0]["betas"][0] = 0.9
    opt.step()
    lr.fill_(-1.0)
    with pytest.raises(ValueError, match=r"Invalid lr: tensor\(-1\.\)"):
        opt.step()
