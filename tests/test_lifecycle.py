"""The optimizer lifecycle (``FusedOptimizer``'s contract): copies, checkpoints old and new, hooks,
resume, step_in_backward, failed steps.

A Hypothesis state machine interleaves steps with everything a training run survives: a state dict
round trip through ``torch.save`` into a new optimizer, ``copy.deepcopy``, ``pickle`` and
``torch.save`` of the whole optimizer, ``add_param_group``, freezing and unfreezing a group, and a
scheduler step, for every optimizer, backend (reference, cpu, triton in its interpreter), bf16 mode
and ``step_in_backward``. Invariant: the interrupted run equals the same run uninterrupted bit for bit
(parameters and the whole state dict), and equals torch.optim/timm.optim where they have the
configuration (fp32): bit for bit on the reference backend, to the kernels' rounding elsewhere.

The regression tests below name each fault this file was written for (issue: "a true drop-in across
the whole optimizer lifecycle"), with the value the fault gave.
"""
from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fused_ft
from fused_ft.testing.specs import OPTIMIZERS
from tests.helpers import assert_close_tensorwise, freed_in_backward

# the state machine calls a scheduler before any step at times, as a resumed run may
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")

CLASSES = {name: spec.cls for name, spec in OPTIMIZERS.items()}
EXACT = dict(backend="reference")  # bit for bit against torch.optim/timm.optim (the kernels round differently)
# one keyword set per optimizer that every mode accepts (LAMB's global clipping cannot run in backward)
KWARGS = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-2), "adamw": dict(lr=1e-2, amsgrad=True),
          "lars": dict(lr=0.5, momentum=0.9, weight_decay=1e-3), "lamb": dict(lr=1e-2, max_grad_norm=None)}
SHAPES = [(4, 3), (3,), (5,), (2, 2), ()]  # groups: [0, 1], [2]; then 3 and 4 added one by one


def _pool(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _grads(step: int, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _backward(optimizer, pool, step: int) -> None:
    """Gradients through autograd (so step_in_backward's hooks run): d/dp sum(g * p) = g exactly."""
    optimizer.zero_grad(set_to_none=True)
    members = [p for group in optimizer.param_groups for p in group["params"]]
    used = [(p, g) for p, g in zip(pool, _grads(step, pool)) if any(p is q for q in members)]
    sum((g * p).sum() for p, g in used).backward()


def assert_same(a, b, path="state_dict"):
    """Equal nested state dicts: same keys, same types, tensors equal bit for bit with the same dtype."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a!r} vs {b!r}"
        assert torch.equal(a, b), f"{path}: {a} vs {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} vs {b!r}"


def _through_bytes(obj, weights_only=True):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


class _Run:
    """One optimizer over a parameter pool, with its scheduler."""

    def __init__(self, make, pool, lr):
        self.pool = pool
        self.optimizer = make([{"params": pool[:2]}, {"params": pool[2:3], "lr": 0.5 * lr}])
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=0.7)

    def replace(self, optimizer):
        """Carry on with ``optimizer`` (a copy or a reload), its parameters taking their places in the pool."""
        old = [p for g in self.optimizer.param_groups for p in g["params"]]
        new = [p for g in optimizer.param_groups for p in g["params"]]
        moved = {id(a): b for a, b in zip(old, new)}
        self.pool = [moved.get(id(p), p) for p in self.pool]
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.7)
        scheduler.load_state_dict(self.scheduler.state_dict())  # the resume recipe of torch's docs
        self.optimizer, self.scheduler = optimizer, scheduler


CONFIGS = [
    (name, backend, dtype, mode, in_backward)
    for name in OPTIMIZERS
    for backend in ("reference", "cpu")
    for dtype, mode in ((torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic"),
                        (torch.bfloat16, "kahan"))
    for in_backward in (False, True)
]
TRITON_CONFIGS = [(name, "triton", torch.float32, "nearest", False) for name in OPTIMIZERS] + [
    ("adamw", "triton", torch.bfloat16, "kahan", True), ("sgd", "triton", torch.bfloat16, "stochastic", False)]


class Lifecycle(RuleBasedStateMachine):
    """``subject`` lives through interruptions; ``same`` is the same configuration, never interrupted;
    ``reference`` is torch.optim/timm.optim where they have the configuration (fp32 parameters)."""

    configs = CONFIGS

    @initialize(config=st.sampled_from(CONFIGS))
    def start(self, config):
        self.setup(config)

    def setup(self, config):
        name, backend, dtype, mode, in_backward = self.config = config
        kwargs = KWARGS[name]
        self.cls, self.kwargs = CLASSES[name], dict(kwargs, backend=backend, step_in_backward=in_backward,
                                                    bf16_update=mode, bf16_seed=7)

        def make(groups):
            return self.cls(groups, **self.kwargs)

        self.make = make
        self.subject, self.same = _Run(make, _pool(dtype), kwargs["lr"]), _Run(make, _pool(dtype), kwargs["lr"])
        self.reference = None
        if dtype == torch.float32:
            self.reference = _Run(lambda groups: OPTIMIZERS[name].reference(groups, **kwargs), _pool(dtype),
                                  kwargs["lr"])
        self.steps = 0
        self.added = 3
        self.frozen = [False, False]

    # -- what a training run does ------------------------------------------------------------------
    @rule()
    def step(self):
        for run in (self.subject, self.same):
            _backward(run.optimizer, run.pool, self.steps)
            run.optimizer.step()
        if self.reference is not None:
            opt = self.reference.optimizer
            for group, frozen in zip(opt.param_groups, self.frozen):
                for p in group["params"]:  # a frozen group is a group without gradients in torch
                    i = next(i for i, q in enumerate(self.reference.pool) if q is p)
                    p.grad = None if frozen else _grads(self.steps, self.reference.pool)[i]
            opt.step()
        self.steps += 1

    @rule()
    def scheduler_step(self):
        for run in self._runs():
            run.scheduler.step()

    @precondition(lambda self: self.added < len(SHAPES))
    @rule()
    def add_param_group(self):
        for run in self._runs():
            # initial_lr: what a scheduler built on the resumed optimizer would set (the groups then compare equal)
            run.optimizer.add_param_group({"params": [run.pool[self.added]], "lr": 0.02, "initial_lr": 0.02})
        self.added += 1
        self.frozen.append(False)

    @rule(index=st.integers(0, 3))
    def toggle_frozen(self, index):
        index %= len(self.frozen)
        self.frozen[index] = not self.frozen[index]
        for run in (self.subject, self.same):
            run.optimizer.param_groups[index]["frozen"] = self.frozen[index]
        if self.config[0] == "lamb":
            self.reference = None  # timm counts LAMB steps of groups without gradients; fused_ft's frozen ones do not

    # -- interruptions (the subject only) ------------------------------------------------------------
    @rule()
    def reload_into_a_new_optimizer(self):
        saved = _through_bytes(self.subject.optimizer.state_dict())
        groups = [{"params": g["params"]} for g in self.subject.optimizer.param_groups]
        fresh = self.make(groups[:3])  # the rest as a resumed script adds them, before loading
        for g in groups[3:]:
            fresh.add_param_group(g)
        fresh.load_state_dict(saved)
        self.subject.replace(fresh)

    @rule()
    def deepcopy(self):
        self.subject.replace(copy.deepcopy(self.subject.optimizer))

    @rule()
    def pickle_round_trip(self):
        self.subject.replace(pickle.loads(pickle.dumps(self.subject.optimizer)))

    @rule()
    def torch_save_whole_optimizer(self):
        self.subject.replace(_through_bytes(self.subject.optimizer, weights_only=False))

    # -- the invariant -------------------------------------------------------------------------------
    @invariant()
    def equals_uninterrupted_runs(self):
        if not hasattr(self, "subject"):
            return
        for i, (p, q) in enumerate(zip(self.subject.pool, self.same.pool)):
            assert torch.equal(p, q), f"param {i}: {p} vs {q}"
        assert_same(self.subject.optimizer.state_dict(), self.same.optimizer.state_dict())
        if self.reference is None:
            return
        rtol = OPTIMIZERS[self.config[0]].reference_rtol
        for i, (p, r) in enumerate(zip(self.subject.pool, self.reference.pool)):
            if self.config[1] == "reference":
                assert torch.equal(p, r), f"param {i}: {p} vs torch/timm {r}"
            else:
                assert_close_tensorwise(p, r, rtol=rtol, what=f"param {i} against torch/timm")

    def _runs(self):
        return [run for run in (self.subject, self.same, self.reference) if run is not None]


Lifecycle.TestCase.settings = settings(max_examples=40, stateful_step_count=12, deadline=None)
test_lifecycle = Lifecycle.TestCase


class TritonLifecycle(Lifecycle):
    """The same on the Triton kernels (CPU interpreter: a few examples; the reference and cpu backends above
    cover the logic, this the kernels' state layout)."""

    @initialize(config=st.sampled_from(TRITON_CONFIGS))
    def start(self, config):
        self.setup(config)


TritonLifecycle.TestCase.settings = settings(max_examples=4, stateful_step_count=8, deadline=None)
test_lifecycle_triton = TritonLifecycle.TestCase


# -- regression tests: each kind of fault, with the value it gave ------------------------------------
def _param(*values, dtype=torch.float32):
    return torch.nn.Parameter(torch.tensor(values, dtype=dtype))


def _stepped(opt, params, steps=2, grad=1.0):
    for _ in range(steps):
        for p in params:
            p.grad = torch.full_like(p, grad)
        opt.step()
    return opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_the_whole_optimizer_step_like_the_original(name, how):
    """Was: AttributeError: no attribute 'step_in_backward' at the copy's first step (all four, all three ways)."""
    p = _param(1.0, -2.0, 3.0)
    opt = _stepped(CLASSES[name]([p], **KWARGS[name], backend="cpu"), [p])
    twin = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)),
            "torch.save": lambda o: _through_bytes(o, weights_only=False)}[how](opt)
    assert twin.backend == "cpu" and twin.step_in_backward is False
    q = twin.param_groups[0]["params"][0]
    _stepped(opt, [p], 1)
    _stepped(twin, [q], 1)
    assert torch.equal(p, q)
    assert_same(opt.state_dict(), twin.state_dict())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_copy_in_step_in_backward_mode_updates_its_own_parameters_in_backward(name):
    p = _param(1.0, -2.0, 3.0)
    opt = CLASSES[name]([p], **KWARGS[name], step_in_backward=True)
    twin = copy.deepcopy(opt)
    q = twin.param_groups[0]["params"][0]
    before = p.detach().clone()
    (q * q).sum().backward()
    twin.step()  # the first iteration waits for step(), which checks the loop around it
    after_step = q.detach().clone()
    (q * q).sum().backward()
    assert not torch.equal(q, after_step)  # updated in backward
    assert torch.equal(p, before) and not opt.state  # the original saw nothing


def test_bf16_momentum_comes_back_bit_for_bit():
    """Was: 1.8984375 (rounded to bf16 and widened back) instead of 1.9 after a state_dict round trip."""
    p = _param(1.0, 1.0, 1.0, dtype=torch.bfloat16)
    opt = _stepped(fused_ft.SGD([p], lr=0.1, momentum=0.9), [p])
    fresh = fused_ft.SGD([p], lr=0.1, momentum=0.9)
    fresh.load_state_dict(_through_bytes(opt.state_dict()))
    buffer = fresh.state[p]["momentum_buffer"]
    assert buffer.dtype == torch.float32
    assert torch.equal(buffer, torch.full((3,), 1.9))  # 0.9 * 1 + 1 in fp32


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("mode", ["nearest", "stochastic", "kahan"])
def test_fp32_state_of_bf16_parameters_survives_a_reload_for_every_optimizer_backend_and_mode(name, backend, mode):
    g = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(5, 7, generator=g).bfloat16())
    opt = CLASSES[name]([p], **KWARGS[name], backend=backend, bf16_update=mode, bf16_seed=1)
    for _ in range(2):
        p.grad = torch.randn(5, 7, generator=g).bfloat16()
        opt.step()
    fresh = CLASSES[name]([p], **KWARGS[name], backend=backend, bf16_update=mode)
    fresh.load_state_dict(_through_bytes(opt.state_dict()))
    assert_same(fresh.state_dict(), opt.state_dict())
    assert any(v.dtype == torch.float32 for v in fresh.state[p].values() if v.ndim) or name == "sgd-nomom"


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_torch_checkpoint_of_bf16_parameters_widens_exactly_and_continues(name):
    """torch keeps bf16 state for bf16 parameters: it loads as its exact fp32 value, and the run continues
    as fused_ft's own run from that state (fp32 math)."""
    p = _param(0.5, -1.5, 2.0, dtype=torch.bfloat16)
    kwargs = KWARGS[name]
    torch_opt = _stepped(OPTIMIZERS[name].reference([p], **kwargs), [p])
    saved = _through_bytes(torch_opt.state_dict())
    assert all(v.dtype == torch.bfloat16 for v in saved["state"][0].values() if v.ndim)
    ours = CLASSES[name]([p], **kwargs)
    ours.load_state_dict(copy.deepcopy(saved))  # torch shares the loaded step tensor; the twin gets its own
    for key, value in saved["state"][0].items():
        assert torch.equal(ours.state[p][key], value.float()), key
        assert ours.state[p][key].dtype == torch.float32
    # the same state, handed over as fp32 by hand: the two runs continue identically
    twin_p = torch.nn.Parameter(p.detach().clone())
    twin = CLASSES[name]([twin_p], **kwargs)
    twin.load_state_dict({**saved, "state": {0: {k: v.float() for k, v in saved["state"][0].items()}}})
    _stepped(ours, [p], 3)
    _stepped(twin, [twin_p], 3)
    assert torch.equal(p, twin_p)


@pytest.mark.parametrize("change", ["load_state_dict", "add_param_group", "replaced param_groups", "deepcopy"])
def test_step_in_backward_survives_what_replaces_groups(change):
    """Was: StopIteration from the hook after load_state_dict, and p not updated (the hooks held old groups).
    Each change also sets a new lr, which the next backward must use."""
    p, extra = _param(1.0, 2.0), _param(3.0)
    opt = fused_ft.SGD([p], lr=0.1, step_in_backward=True)
    (p * p / 2).sum().backward()  # gradient p: p = 0.9 p
    opt.step()
    if change == "load_state_dict":
        saved = opt.state_dict()
        saved["param_groups"][0]["lr"] = 0.5
        opt.load_state_dict(saved)
    elif change == "add_param_group":
        opt.add_param_group({"params": [extra], "lr": 0.5})
        opt.param_groups[0]["lr"] = 0.5
    elif change == "replaced param_groups":
        opt.param_groups = [dict(opt.param_groups[0], lr=0.5)]
    else:
        opt = copy.deepcopy(opt)
        opt.param_groups[0]["lr"] = 0.5
        p = opt.param_groups[0]["params"][0]
    (p * p / 2).sum().backward()
    if change == "deepcopy":
        opt.step()  # a copy checks its loop again: its first iteration waits for step()
    assert torch.allclose(p, torch.tensor([1.0, 2.0]) * 0.9 * 0.5) and freed_in_backward(opt)
    if change == "add_param_group":
        opt.step()
        (extra * extra / 2).sum().backward()
        assert torch.allclose(extra, torch.tensor([1.5]))  # 3 - 0.5 * 3: the new group's lr


def test_step_in_backward_refuses_a_second_gradient_before_step():
    """Was: p ended at 0.25 (two updates of lr 0.5) with no error; now the second backward raises, after
    the first update only."""
    p = torch.nn.Parameter(torch.tensor(1.0))
    opt = fused_ft.SGD([p], lr=0.5, step_in_backward=True)
    (p * p / 2).backward()
    opt.step()  # the first iteration, applied by step()
    (p * p / 2).backward()
    with pytest.raises(RuntimeError, match=r"Invalid gradient accumulation with step_in_backward=True: group 0 "
                                           r"param 0 \(shape \(\)\).*call optimizer.step\(\) after every backward"):
        (p * p / 2).backward()
    assert p.item() == 0.25
    opt.step()  # the refused gradient is dropped, never applied; the next iteration may start
    assert p.item() == 0.25 and p.grad is None
    (p * p / 2).backward()
    assert p.item() == 0.125


def test_step_in_backward_frees_the_gradients_that_step_applies():
    """A parameter unfrozen after the optimizer was built has no hook until the next step(), which applies
    its gradient: it must free it, as a hook does. Was: the gradient stayed, the next backward added to it,
    and it was applied twice (p = 0.4 instead of 0.6; found by a reviewer)."""
    p = torch.nn.Parameter(torch.tensor(1.0), requires_grad=False)
    opt = fused_ft.SGD([p], lr=0.2, step_in_backward=True)
    p.requires_grad_(True)  # gradual unfreezing through the API
    p.backward()  # gradient 1, no hook yet
    opt.step()
    assert p.item() == pytest.approx(0.8) and p.grad is None
    p.backward()  # hooked now: updated in backward
    opt.step()
    assert p.item() == pytest.approx(0.6) and p.grad is None


def _old(state_dict, drop_group_keys=()):
    """A state dict as an older torch or timm wrote it: steps as plain numbers, group keys missing."""
    old = copy.deepcopy(state_dict)
    for entry in old["state"].values():
        if "step" in entry:
            entry["step"] = int(entry["step"].item())
    for group in old["param_groups"]:
        if "step" in group:
            group["step"] = int(group["step"].item())
        for key in drop_group_keys:
            group.pop(key, None)
    return old


@pytest.mark.parametrize("name,dropped", [
    ("adamw", ("maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")),
    ("sgd", ("maximize", "foreach", "differentiable", "fused")),
    ("lamb", ("caution", "decoupled_decay", "corrected_weight_decay")),
    ("lars", ("nesterov",)),
])
def test_older_checkpoint_formats_load_and_continue_as_torch_and_timm_continue(name, dropped):
    """Was: TypeError: increment_steps(): incompatible function arguments (AdamW, a step saved as 1)."""
    spec = OPTIMIZERS[name]
    kwargs = dict(KWARGS[name], **({"max_grad_norm": 1.0} if name == "lamb" else {}))
    p = _param(0.5, -1.0, 2.0)
    saved = _old(_stepped(spec.reference([p], **kwargs), [p]).state_dict(), dropped)
    ours_p, theirs_p = (torch.nn.Parameter(p.detach().clone()) for _ in range(2))
    # built with a non-default value of a key the checkpoint lacks: torch and timm fill it with the class's
    # default, not the constructor's, and so must fused_ft
    resumed = {**kwargs, **{"adamw": {"maximize": True}, "sgd": {"maximize": True}, "lamb": {"decoupled_decay": True},
                            "lars": {"nesterov": True}}[name]}
    ours, theirs = CLASSES[name]([ours_p], **resumed, **EXACT), spec.reference([theirs_p], **resumed)
    ours.load_state_dict(copy.deepcopy(saved))
    theirs.load_state_dict(copy.deepcopy(saved))
    _stepped(ours, [ours_p], 3, grad=0.3)
    _stepped(theirs, [theirs_p], 3, grad=0.3)
    assert torch.equal(ours_p, theirs_p)
    step = ours.param_groups[0]["step"] if name == "lamb" else ours.state[ours_p].get("step")
    if step is not None:
        assert step.dtype == torch.float32 and step.item() == 5


def test_torch_2_0_sgd_state_with_none_buffers_loads():
    p = _param(1.0, 2.0)
    saved = {"state": {0: {"momentum_buffer": None}},
             "param_groups": [{"lr": 0.1, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False,
                               "maximize": False, "foreach": None, "differentiable": False, "params": [0]}]}
    opt = fused_ft.SGD([p], lr=0.5)
    opt.load_state_dict(saved)
    _stepped(opt, [p], 1)
    assert torch.equal(p, torch.tensor([0.9, 1.9]))


def _two_adamw_groups():
    a, b = _param(1.0, 2.0), _param(3.0, 4.0)
    opt = fused_ft.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, **EXACT)
    return _stepped(opt, [a, b], 1), a, b


def test_amsgrad_turned_on_mid_run_starts_its_running_maximum_at_the_next_step():
    """Was: a bare KeyError: 'max_exp_avg_sq' after group 0 had been updated and its step counted. Now the
    maximum starts at zeros, so the first amsgrad step equals a plain step (torch.optim.AdamW as oracle)."""
    opt, a, b = _two_adamw_groups()
    reference_b = torch.nn.Parameter(b.detach().clone())
    reference = torch.optim.AdamW([reference_b], lr=0.1)
    reference.load_state_dict({"state": {0: copy.deepcopy(opt.state[b])},
                               "param_groups": [dict(reference.param_groups[0], params=[0])]})
    opt.param_groups[1]["amsgrad"] = True
    _stepped(opt, [a, b], 1)
    _stepped(reference, [reference_b], 1)
    assert torch.equal(b, reference_b)
    assert torch.equal(opt.state[b]["max_exp_avg_sq"], opt.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("damage,message", [
    (lambda s: s.update(exp_avg=torch.zeros(3)), r"state\['exp_avg'\] with shape \(3,\), expected \(2,\)"),
    (lambda s: s.pop("exp_avg_sq"), r"'step', 'exp_avg' but no 'exp_avg_sq'"),
    (lambda s: s.update(exp_avg=s["exp_avg"].double()), r"state\['exp_avg'\] with dtype torch.float64, expected "
                                                         r"torch.float32.*load_state_dict\(optimizer.state_dict\(\)\)"),
    (lambda s: s.update(step=3), r"state\['step'\] = 3 \(must be a one-element floating tensor"),
    (lambda s: s.update(exp_avg=[0.0, 0.0]), r"state\['exp_avg'\] = \[0.0, 0.0\] \(must be a tensor shaped like"),
])
@pytest.mark.parametrize("path", ["C++", "Python"])
def test_state_problems_are_refused_before_any_update_naming_where_and_the_fix(damage, message, path, monkeypatch):
    from fused_ft.optim import _state

    if path == "Python":  # the fallback where the extension is not built
        monkeypatch.setattr(_state, "_C", None)
    opt, a, b = _two_adamw_groups()
    damage(opt.state[b])
    before = copy.deepcopy((a.detach().clone(), opt.state[a]))
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match=r"Invalid state: group 1 param 0 \(shape \(2,\), torch.float32, cpu\) has "
                                         + message):
        opt.step()
    assert torch.equal(a, before[0])  # group 0, planned first, was not updated
    assert_same(opt.state[a], before[1])  # nor its step counted


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_state_dict_of_other_parameters_is_refused_before_any_change(name):
    p, wide = _param(1.0, 2.0), _param(1.0, 2.0, 3.0)
    saved = _stepped(CLASSES[name]([wide], **KWARGS[name]), [wide]).state_dict()
    opt = _stepped(CLASSES[name]([p], **dict(KWARGS[name], lr=0.3)), [p])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"Invalid state_dict: group 0 param 0 \(shape \(2,\)\) would get state"
                                         r"\['[a-z_]+'\] of shape \(3,\).*same parameters"):
        opt.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"Invalid state_dict: group 0 has 2 parameters, this optimizer's group 0 "
                                         r"has 1 \(loaded state dict contains a parameter group"):
        opt.load_state_dict({**saved, "param_groups": [dict(saved["param_groups"][0], params=[0, 1])]})
    assert_same(opt.state_dict(), before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_save_load_save_gives_equal_dicts_and_timm_and_torch_agree(name):
    """Was: LARS's and LAMB's reloaded groups gained a 'differentiable' key (timm's own test compares them)."""
    p = _param(1.0, -2.0)
    opt = _stepped(CLASSES[name]([p], **KWARGS[name]), [p])
    first = opt.state_dict()
    fresh = CLASSES[name]([p], **KWARGS[name])
    fresh.load_state_dict(copy.deepcopy(first))
    assert_same(fresh.state_dict(), first)
    theirs = OPTIMIZERS[name].reference([p], **KWARGS[name])
    theirs.load_state_dict(copy.deepcopy(first))
    back = CLASSES[name]([p], **KWARGS[name])
    back.load_state_dict(theirs.state_dict())
    assert_same(back.state_dict(), first)  # through torch.optim/timm.optim and back: nothing lost or added


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_numpy_scalars_are_accepted_for_every_hyperparameter_as_torch_accepts_them(name):
    """Was: Invalid lr: np.float32(0.1) (must be a number)."""
    spec = OPTIMIZERS[name]
    kwargs = dict(KWARGS[name])
    numpy_kwargs = {k: (np.float32(v) if isinstance(v, float) else np.int64(v) if type(v) is int
                        else np.bool_(v) if isinstance(v, bool) else v) for k, v in kwargs.items()}
    numpy_kwargs["maximize" if name in ("sgd", "adamw") else "always_adapt"] = np.bool_(False)
    kwargs["maximize" if name in ("sgd", "adamw") else "always_adapt"] = False
    if "betas" in spec.defaults:
        numpy_kwargs["betas"] = (np.float64(0.9), np.float32(0.99))
        kwargs["betas"] = (0.9, float(np.float32(0.99)))
    ours_p, theirs_p = _param(1.0, -2.0), _param(1.0, -2.0)
    ours = CLASSES[name]([ours_p], **numpy_kwargs, **EXACT)
    ours.param_groups[0]["lr"] = np.float32(kwargs["lr"])  # as a hand-written schedule stores it
    theirs = spec.reference([theirs_p], **{**kwargs, "lr": float(np.float32(kwargs["lr"]))})
    _stepped(ours, [ours_p], 3)
    _stepped(theirs, [theirs_p], 3)
    assert torch.equal(ours_p, theirs_p)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_empty_param_group_is_accepted_as_torch_and_timm_accept_it(name):
    """Was: Invalid params: group 1 is an empty parameter list (timm's param_groups_weight_decay makes one
    for a model without biases)."""
    ours_p, theirs_p = _param(1.0, -2.0), _param(1.0, -2.0)
    ours = CLASSES[name]([{"params": [ours_p]}, {"params": [], "weight_decay": 0.0}], **KWARGS[name], **EXACT)
    theirs = OPTIMIZERS[name].reference([{"params": [theirs_p]}, {"params": [], "weight_decay": 0.0}],
                                        **KWARGS[name])
    _stepped(ours, [ours_p], 3)
    _stepped(theirs, [theirs_p], 3)
    assert torch.equal(ours_p, theirs_p)
    assert_same(ours.state_dict()["state"], theirs.state_dict()["state"])


def test_load_state_dict_hooks_see_the_given_dict_and_the_final_state():
    p = _param(1.0, 2.0, dtype=torch.bfloat16)
    opt = _stepped(fused_ft.AdamW([p], bf16_update="kahan"), [p])
    saved = opt.state_dict()
    seen = {}
    fresh = fused_ft.AdamW([p], bf16_update="kahan")
    fresh.register_load_state_dict_pre_hook(lambda o, sd: seen.update(pre=sd["state"][0]["exp_avg"]))

    def post(o):
        seen["post"] = {k: v.dtype for k, v in o.state[p].items()}
        o.state[p]["exp_avg"].mul_(0)  # what a post-hook writes stays

    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(saved)
    assert seen["pre"] is saved["state"][0]["exp_avg"]
    assert seen["post"] == {"step": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32,
                            "kahan_comp": torch.int16}
    assert not fresh.state[p]["exp_avg"].any()


def test_state_dict_hooks_see_fp32_state_and_their_changes_are_returned():
    p = _param(1.0, 2.0, dtype=torch.bfloat16)
    opt = _stepped(fused_ft.SGD([p], lr=0.1, momentum=0.9), [p])
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))

    def post(o, state_dict):
        seen.append(state_dict["state"][0]["momentum_buffer"].dtype)
        state_dict["note"] = "kept"
        return state_dict

    opt.register_state_dict_post_hook(post)
    assert opt.state_dict()["note"] == "kept" and seen == ["pre", torch.float32]


def test_step_hooks_run_around_step_and_copies_start_without_them_as_in_torch():
    p = _param(1.0)
    opt = fused_ft.SGD([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    _stepped(opt, [p], 1)
    _stepped(copy.deepcopy(opt), [p], 1)
    assert calls == ["pre", "post"]


# -- peer suites: the checks of timm's tests/test_optim.py and optimi's CPU tests, for fused_ft ----------
BACKENDS = ["reference", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_timm_state_dict_check(name, backend):
    """timm's _test_state_dict: 20 steps of (W x + b)^2, a fresh optimizer on cloned parameters loads a deep
    copy of the state dict, 20 more steps side by side equal at every step, equal state dicts, the loaded
    dict left as it was, and a deep copy with the same public attributes."""
    g = torch.Generator().manual_seed(0)
    weight, bias, x = torch.randn(10, 5, generator=g), torch.randn(10, generator=g), torch.randn(5, generator=g)
    params = [torch.nn.Parameter(weight), torch.nn.Parameter(bias)]

    def closure(opt, w, b):
        opt.zero_grad()
        loss = (w @ x + b).pow(2).sum()
        loss.backward()
        return loss

    opt = CLASSES[name](params, **KWARGS[name], backend=backend)
    for _ in range(20):
        opt.step(lambda: closure(opt, *params))
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = CLASSES[name](clones, **KWARGS[name], backend=backend)
    saved = copy.deepcopy(opt.state_dict())
    loaded.load_state_dict(saved)
    for _ in range(20):
        opt.step(lambda: closure(opt, *params))
        loaded.step(lambda: closure(loaded, *clones))
        assert all(torch.equal(a, b) for a, b in zip(params, clones))
    assert_same(loaded.state_dict(), opt.state_dict())
    assert_same(saved, copy.deepcopy(saved))
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert {k for k in vars(copy.deepcopy(opt)) if not k.startswith("_")} == public


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_timm_small_model_loss_decreases_at_every_step(name, backend):
    """timm's _test_model: Linear(2, 3), Sigmoid, Linear(3, 1), Sigmoid, fixed weights, 20 steps, the summed
    output falls at every step; here also equal to timm's/torch's optimizer on the same model."""
    def model():
        net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor([[-0.2, 0.5], [0.1, -0.3], [0.4, 0.2]]))
            net[0].bias.copy_(torch.tensor([0.1, -0.1, 0.05]))
            net[2].weight.copy_(torch.tensor([[0.3, -0.2, 0.5]]))
            net[2].bias.copy_(torch.tensor([-0.1]))
        return net

    x = torch.arange(0.1, 0.65, 0.1)[:6].reshape(3, 2)
    kwargs = dict(KWARGS[name], lr=0.1 if name in ("sgd", "lars") else 1e-2)
    ours_net, theirs_net = model(), model()
    ours = CLASSES[name](ours_net.parameters(), **kwargs, backend=backend)
    theirs = OPTIMIZERS[name].reference(theirs_net.parameters(), **kwargs)
    losses = []
    for _ in range(20):
        for net, opt in ((ours_net, ours), (theirs_net, theirs)):
            opt.zero_grad()
            loss = net(x).sum()
            loss.backward()
            opt.step()
        losses.append(loss.item())
        for a, b in zip(ours_net.parameters(), theirs_net.parameters()):
            if backend == "reference":
                assert torch.equal(a, b)
            else:
                assert_close_tensorwise(a, b, rtol=1e-5, what="param")
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses


# what timm's tests build through create_optimizer_v2(..., lr=1e-3): no weight decay, momentum 0.9; AdamW at
# 1e-2 (at 1e-3 torch.optim.AdamW itself ends farther away than it started: 0.760 against 0.707)
TIMM_FACTORY = {"sgd": dict(lr=1e-3, momentum=0.9), "adamw": dict(lr=1e-2, weight_decay=0.0),
                "lars": dict(lr=1e-3, momentum=0.9), "lamb": dict(lr=1e-3, weight_decay=0.0)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_timm_rosenbrock_coordinate_descent_gets_closer(name, backend):
    """timm's _test_rosenbrock: from (1.5, 1.5), 2000 steps whose gradient alternates between the two
    coordinates (timm builds it sparse and makes it dense: here dense); the end is no farther from the
    minimum (1, 1) than the start."""
    point = torch.nn.Parameter(torch.tensor([1.5, 1.5]))
    opt = CLASSES[name]([point], **TIMM_FACTORY[name], backend=backend)
    start = torch.dist(point.detach(), torch.ones(2)).item()
    for i in range(2000):
        x, y = point.detach()
        full = torch.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])
        keep = 1 - i % 2  # y on even steps, x on odd ones
        point.grad = torch.zeros(2)
        point.grad[keep] = full[keep]
        opt.step()
    assert torch.dist(point.detach(), torch.ones(2)).item() <= start


@pytest.mark.parametrize("mode", ["nearest", "kahan"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimi_save_load_every_two_steps_through_the_safe_loader(name, mode):
    """optimi's save/load check: every other step of 20, torch.save the state dict, torch.load it with
    weights_only=True into a brand-new optimizer; the run stays equal to the uninterrupted one."""
    dtype = torch.float32 if mode == "nearest" else torch.bfloat16
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(dtype)]
    nets.append(copy.deepcopy(nets[0]))
    make = [lambda net=net: CLASSES[name](net.parameters(), **KWARGS[name], bf16_update=mode) for net in nets]
    opts = [m() for m in make]
    g = torch.Generator().manual_seed(1)
    for i in range(20):
        x = torch.randn(2, 8, generator=g).to(dtype)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).float().pow(2).mean().backward()
            opt.step()
        if i > 0 and i % 2 == 0:
            saved = _through_bytes(opts[1].state_dict())
            opts[1] = make[1]()
            opts[1].load_state_dict(saved)
        for a, b in zip(*(net.parameters() for net in nets)):
            assert torch.equal(a, b)
    assert_same(opts[1].state_dict(), opts[0].state_dict())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimi_gradient_release_with_zero_grad_on_some_iterations(name):
    """optimi's gradient-release check: step_in_backward against a plain step, with zero_grad() called
    on about half of the iterations (a no-op once gradients are released) and step() after each backward."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))]
    nets.append(copy.deepcopy(nets[0]))
    plain = CLASSES[name](nets[0].parameters(), **KWARGS[name])
    released = CLASSES[name](nets[1].parameters(), **KWARGS[name], step_in_backward=True)
    g = torch.Generator().manual_seed(1)
    for i in range(12):
        x = torch.randn(4, 8, generator=g)
        plain.zero_grad()
        nets[0](x).pow(2).mean().backward()
        plain.step()
        if i % 2:
            released.zero_grad()
        nets[1](x).pow(2).mean().backward()
        assert freed_in_backward(released) == (i > 0)  # the first iteration waits for step()
        released.step()
    for a, b in zip(*(net.parameters() for net in nets)):
        assert_close_tensorwise(b, a, rtol=OPTIMIZERS[name].reference_rtol, what="param")
