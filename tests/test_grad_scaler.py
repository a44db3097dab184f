"""torch.amp.GradScaler on fused_ft's optimizers, which take its grad_scale and found_inf as torch's fused
optimizers do (``_step_supports_amp_scaling``; ``FusedOptimizer._take_scaler``).

Before, GradScaler unscaled every gradient with a foreach pass and read found_inf on the host before each
step: a device sync per step on a GPU. Now the triton backend's SGD and AdamW kernels unscale gradients
as they load them and skip a step with an inf on the device (AdamW: where its step counts live on the
device, fused=True or capturable=True, as torch's); elsewhere found_inf is read once and the gradients
are unscaled in place, as GradScaler itself does for torch.optim's for-loop optimizers.

The references: torch's fused AdamW and SGD under the same GradScaler loop (they take the scaler the same
way), and torch's for-loop AdamW/SGD and timm's LARS/LAMB (GradScaler unscales for them), which the
reference backend equals bit for bit. Losses are scaled by a power of two, so unscaling is exact.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fused_ft.kernels import triton_launch
from fused_ft.testing.specs import OPTIMIZERS

BACKENDS = ["reference", "cpu", "triton"]
INF = float("inf")


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _snapshot(model, opt) -> tuple:
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return params, grads, copy.deepcopy(opt.state_dict()["state"])


def _unchanged_state(before: dict, after: dict) -> bool:
    """The state a skipped step leaves: as it was, plus, where the step was a parameter's first, fresh state
    (zeros, step 0), which torch's fused AdamW and SGD create there too and which a later step takes as new."""
    fresh = all(not t.any() for k in after.keys() - before.keys() for t in after[k].values())
    return fresh and all(before[k].keys() == after[k].keys() and all(torch.equal(before[k][n], after[k][n])
                                                                     for n in before[k]) for k in before)


def _train(make_opt, *, dtype=torch.float32, autocast=False, inf_at=(2,), steps=6, unscale_first=False):
    """A GradScaler loop; each step with an inf in its loss is checked to change nothing."""
    model = _model(dtype)
    opt = make_opt(model.parameters() if getattr(make_opt, "takes", "parameters") == "parameters" else model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g).to(dtype), torch.randn(32, 4, generator=g).to(dtype)
    for i in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        loss = ((out.float() - y.float()) ** 2).mean() * (INF if i in inf_at else 1.0)
        scaler.scale(loss).backward()
        if unscale_first:  # the clipping recipe: unscale_, clip, then step with found_inf alone
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e3)
        before = _snapshot(model, opt) if i in inf_at else None
        scaler.step(opt)
        if before is not None:
            after = _snapshot(model, opt)
            assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), f"step {i}: weights changed"
            for a, b in zip(before[1], after[1]):  # the grads hold the inf's NaNs: equal, NaN for NaN
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"step {i}: grads changed")
            assert _unchanged_state(before[2], after[2]), f"step {i}: state changed"
        scaler.update()
        opt.zero_grad()
    return model, opt


def _close(ours, theirs, **tol) -> None:
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, **tol)


def _adamw_cases():
    for backend in BACKENDS:
        for flags in ({}, {"fused": True}, {"capturable": True}):
            if backend == "reference" and flags.get("fused"):
                continue  # the reference backend is not fused
            yield pytest.param(backend, flags, id=f"{backend}-{'-'.join(flags) or 'default'}")


LOOPS = {
    "fp32": dict(),
    "bf16-autocast": dict(autocast=True),
    "fp16-params": dict(dtype=torch.float16),
    "unscale-then-clip": dict(unscale_first=True),
    "first-step-inf": dict(inf_at=(0, 3)),
}


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("backend, flags", list(_adamw_cases()))
def test_adamw_under_a_grad_scaler_follows_torchs_fused_adamw(backend, flags, loop):
    kwargs = dict(lr=1e-2, weight_decay=0.05)
    ours, opt = _train(lambda ps: OPTIMIZERS["adamw"].cls(ps, backend=backend, **kwargs, **flags), **LOOPS[loop])
    # fp16 parameters: torch's fused AdamW keeps fp16 moments, whose squares of small gradients underflow (0.3 away
    # from its own fp32 run after these 6 steps); fused_ft keeps fp32 moments (see the next test), and stays
    # within fp16's rounding of the weights (measured 4e-4) of torch's fp32 run
    fp16 = loop == "fp16-params"
    theirs, ref = _train(lambda ps: torch.optim.AdamW(ps, fused=True, **kwargs),
                         **{**LOOPS[loop], "dtype": torch.float32})
    _close(ours, theirs.to(ours[0].weight.dtype), **(dict(rtol=0, atol=1e-3) if fp16 else dict(rtol=1e-5, atol=1e-6)))
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item()  # skipped steps are not counted
        assert opt.state[p]["step"].device == p.device


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_parameters_take_torchs_fused_adamw_first_step(backend):
    """One step on fp16 parameters equals torch's fused AdamW's (the moments agree until they are rounded)."""
    kwargs = dict(lr=1e-2, weight_decay=0.05)
    ours, _ = _train(lambda ps: OPTIMIZERS["adamw"].cls(ps, backend=backend, **kwargs), dtype=torch.float16, steps=1)
    theirs, _ = _train(lambda ps: torch.optim.AdamW(ps, fused=True, **kwargs), dtype=torch.float16, steps=1)
    _close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loop", ["fp32", "bf16-autocast", "unscale-then-clip"])
def test_sgd_under_a_grad_scaler_follows_torchs_fused_sgd(backend, loop):
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours, _ = _train(lambda ps: OPTIMIZERS["sgd"].cls(ps, backend=backend, **kwargs), **LOOPS[loop])
    theirs, _ = _train(lambda ps: torch.optim.SGD(ps, fused=True, **kwargs), **LOOPS[loop])
    _close(ours, theirs, rtol=1e-5, atol=1e-6)


def _reference_loop_cases():
    for name, spec in OPTIMIZERS.items():
        variant = dict(next(iter(spec.variants.values())))
        if name in ("sgd", "lars"):
            variant.update(momentum=0.9, dampening=0.3)  # a skipped first step must leave no buffer behind
        yield pytest.param(name, variant, id=name)


@pytest.mark.parametrize("name, variant", list(_reference_loop_cases()))
def test_the_reference_backend_equals_torch_and_timm_under_the_same_scaler_bit_for_bit(name, variant):
    """GradScaler unscales for torch.optim's for-loop optimizers and timm's (no _step_supports_amp_scaling) and
    skips their step on the host; the reference backend's result is theirs, bit for bit, a skipped first step
    included. (torch's fused SGD gets that step wrong: on the CPU, torch 2.14, it leaves a momentum buffer of
    uninitialized memory; LibreYOLO stopped using it after fp16 overflows corrupted its momentum on CUDA,
    torch 2.11: LibreYOLO/libreyolo#771.)"""
    spec = OPTIMIZERS[name]
    ours, opt = _train(lambda ps: spec.cls(ps, backend="reference", **variant), inf_at=(0, 3))
    theirs, _ = _train(lambda ps: spec.reference(ps, **variant), inf_at=(0, 3))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name, variant", list(_reference_loop_cases()))
def test_every_backend_follows_the_reference_under_a_scaler(name, variant, backend):
    """The kernel backends under the same loop, a skipped first step included: with dampening the triton kernels
    cannot tell a skipped first step from a taken one, so the host reads found_inf there (SGD, LARS)."""
    spec = OPTIMIZERS[name]
    ours, _ = _train(lambda ps: spec.cls(ps, backend=backend, **variant), inf_at=(0, 3))
    theirs, _ = _train(lambda ps: spec.cls(ps, backend="reference", **variant), inf_at=(0, 3))
    _close(ours, theirs, rtol=1e-5, atol=1e-6)


class _HostRead(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Reads on the host (item, tolist, bool, float, int) of the tensors that live on the GPU in a CUDA run
    (parameters, gradients, state, GradScaler's): each would be a sync there. Set ``guarded`` to their
    storages to enable (host-side tables, CPU tensors on a GPU too, may be read)."""
    state = {"guarded": set()}

    def guard(method):
        original = getattr(torch.Tensor, method)

        def read(self, *args, **kwargs):
            if self.untyped_storage().data_ptr() in state["guarded"]:
                raise _HostRead(f"Tensor.{method} read a value on the host")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, read)

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        guard(method)
    return state


def _device_tensors(opt) -> set[int]:
    """The storages of every tensor a CUDA step keeps on the device: parameters, gradients, state, the scaler's."""
    tensors = [t for g in opt.param_groups for p in g["params"] for t in (p, p.grad, *opt.state[p].values())
               if isinstance(t, torch.Tensor)]
    tensors += [t for name in ("grad_scale", "found_inf") if isinstance(t := opt.__dict__.get(name), torch.Tensor)]
    return {t.untyped_storage().data_ptr() for t in tensors}


def _scaled_step(opt, model, found_inf: float) -> None:
    """What GradScaler.step sets before it calls step(), with a chosen verdict."""
    model(torch.ones(2, 8)).sum().mul(1024.0).backward()
    opt.grad_scale, opt.found_inf = torch.full((1,), 1024.0), torch.full((1,), found_inf)
    opt.step()
    del opt.grad_scale, opt.found_inf


@pytest.mark.parametrize("name, flags", [("sgd", dict(lr=0.1, momentum=0.9)), ("adamw", dict(fused=True)),
                                         ("adamw", dict(capturable=True)),
                                         ("lars", dict(lr=0.5, momentum=0.9, weight_decay=1e-4)),
                                         ("lamb", dict(capturable=True, max_grad_norm=0.5))],
                         ids=["sgd", "adamw-fused", "adamw-capturable", "lars", "lamb-capturable"])
def test_the_triton_kernels_unscale_and_skip_without_a_host_read(name, flags, no_host_reads):
    """The triton kernels take both tensors: a step, and one with an inf, read nothing on the host (a sync on a
    GPU), and the skipped step still launches its kernels (the skip happens in them). The reference backend
    reads found_inf, which the same guard catches: the guard works."""
    model = _model()
    opt = OPTIMIZERS[name].cls(model.parameters(), backend="triton", **flags)
    _scaled_step(opt, model, 0.0)  # the first step creates state on the host
    opt.zero_grad()
    for found_inf in (0.0, 1.0):
        model(torch.ones(2, 8)).sum().mul(1024.0).backward()
        before = sum(triton_launch.launches().values())
        grads = [p.grad.clone() for p in model.parameters()]
        weights = [p.detach().clone() for p in model.parameters()]
        opt.grad_scale, opt.found_inf = torch.full((1,), 1024.0), torch.full((1,), found_inf)
        no_host_reads["guarded"] = _device_tensors(opt)
        opt.step()
        no_host_reads["guarded"] = set()
        del opt.grad_scale, opt.found_inf
        assert sum(triton_launch.launches().values()) > before
        if found_inf:
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        else:  # unscaled in the kernel and stored back, as torch's fused kernels leave p.grad
            assert all(torch.equal(p.grad, g / 1024.0) for p, g in zip(model.parameters(), grads))
        opt.zero_grad()
    reference = OPTIMIZERS[name].cls(model.parameters(), backend="reference", **{k: v for k, v in flags.items()
                                                                                 if k != "fused"})
    model(torch.ones(2, 8)).sum().backward()
    reference.grad_scale, reference.found_inf = torch.full((1,), 1024.0), torch.zeros(1)
    no_host_reads["guarded"] = _device_tensors(reference)
    with pytest.raises(_HostRead):
        reference.step()


def test_several_groups_take_the_scaler_one_way_and_follow_torch():
    """Groups whose kernels take the scaler beside one whose do not: the whole step takes the host route (each
    group unscaled, found_inf read once), equal to torch's AdamW with the same groups."""
    def groups(model, flags):
        return [{"params": model[0].parameters(), "lr": 1e-2, **flags[0]},
                {"params": model[2].parameters(), "lr": 3e-3, **flags[1]}]

    def by_module(make):
        make.takes = "module"
        return make

    for flags in ([dict(capturable=True), dict()], [dict(capturable=True), dict(fused=True)]):
        ours, _ = _train(by_module(lambda m: OPTIMIZERS["adamw"].cls(groups(m, flags), backend="triton")),
                         inf_at=(0, 3))
        theirs, _ = _train(by_module(lambda m: torch.optim.AdamW(groups(m, [{}, {}]), fused=True)), inf_at=(0, 3))
        _close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("route", ["reference", "cpu-fused", "triton-host", "triton-kernel"])
def test_fp16_gradients_that_fp16_cannot_hold_unscaled_still_update(route):
    """A tiny loss: its fp16 gradients, unscaled, are below fp16's range. The host route used to unscale them in
    fp16, flushing them to zero (no update at all); unscaled in fp32 on either route, the weights move, and the
    routes agree (torch's fused AdamW keeps fp16 moments, which differ; its for-loop AdamW refuses fp16 unscaling)."""
    backend, flags = {"reference": ("reference", {}), "cpu-fused": ("cpu", dict(fused=True)),
                      "triton-host": ("triton", {}), "triton-kernel": ("triton", dict(fused=True))}[route]
    moved = []
    for make in (lambda ps: OPTIMIZERS["adamw"].cls(ps, backend=backend, lr=1e-3, **flags),
                 lambda ps: OPTIMIZERS["adamw"].cls(ps, backend="triton", lr=1e-3, fused=True)):
        model = _model(torch.float16)
        start = [p.detach().float().clone() for p in model.parameters()]
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(2)).half()
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(model(x).float().square().mean() * 1e-9).backward()
            scaled = [p.grad.clone() for p in model.parameters()]
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
        # p.grad holds the unscaled gradient, rounded to fp16, as torch's fused kernels leave it
        assert all(torch.equal(p.grad, (g.float() / scale).half()) for p, g in zip(model.parameters(), scaled))
        moved.append([p.detach().float() - s for p, s in zip(model.parameters(), start)])
    assert max(d.abs().max().item() for d in moved[0]) > 1e-5
    for a, b in zip(*moved):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * 2**-10)  # one fp16 ulp of these weights


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_skipped_step_leaves_stochastic_rounding_where_the_reference_leaves_it(name):
    """bf16 with stochastic rounding: the random stream's counter advances on the host with each update, so a
    step the kernels would skip on the device goes the host route, and every backend keeps the reference's bits."""
    flags = dict(lr=0.05, momentum=0.9) if name == "sgd" else dict(lr=1e-2, fused=True)
    runs = {}
    for backend in BACKENDS:
        kwargs = {k: v for k, v in flags.items() if not (backend == "reference" and k == "fused")}
        model, opt = _train(lambda ps: OPTIMIZERS[name].cls(ps, backend=backend, bf16_update="stochastic", bf16_seed=7,
                                                             **kwargs), dtype=torch.bfloat16, inf_at=(3,))
        runs[backend] = ([p.detach().clone() for p in model.parameters()], opt.param_groups[0]["bf16_step"])
    for backend in ("cpu", "triton"):
        assert runs[backend][1] == runs["reference"][1] == 5
        assert all(torch.equal(a, b) for a, b in zip(runs[backend][0], runs["reference"][0])), backend


@pytest.mark.parametrize("name, flags", [("sgd", dict(lr=0.1, momentum=0.9)), ("adamw", dict(fused=True)),
                                         ("lars", dict(lr=0.5, momentum=0.9, weight_decay=1e-4))],
                         ids=["sgd", "adamw", "lars"])
def test_a_parameter_that_is_not_aligned_gets_its_gradient_back_unscaled(name, flags):
    """A view 4 bytes into its storage goes through an aligned copy: the kernel's unscaled gradient is copied back
    too, as for an aligned one."""
    base = torch.randn(1001)
    params = [torch.nn.Parameter(base[1:]), torch.nn.Parameter(torch.randn(64))]
    opt = OPTIMIZERS[name].cls(params, backend="triton", **flags)
    for p in params:
        p.grad = torch.randn(p.shape) * 1024.0
    scaled = [p.grad.clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.full((1,), 1024.0), torch.zeros(1)
    opt.step()
    assert params[0].data_ptr() % 16 and all(torch.equal(p.grad, g / 1024.0) for p, g in zip(params, scaled))


@pytest.mark.parametrize("loop", ["fp32", "unscale-then-clip", "first-step-inf"])
def test_capturable_lamb_takes_the_scaler_in_its_kernels_and_follows_timm(loop):
    """LAMB with capturable=True on the triton backend: the group step on the device, GradScaler's tensors in the
    kernels (the global clip's norm divided by the scale), against timm's Lamb under the same loop."""
    # a large eps makes the update depend on the clipped gradient's size (LAMB's m/sqrt(v) barely does): a clip
    # norm divided by the scale twice was 2e-6 off, within the usual tolerance
    kwargs = dict(lr=1e-2, max_grad_norm=0.5, eps=1e-2)
    ours, opt = _train(lambda ps: OPTIMIZERS["lamb"].cls(ps, backend="triton", capturable=True, **kwargs),
                       **LOOPS[loop])
    theirs, ref = _train(lambda ps: OPTIMIZERS["lamb"].reference(ps, **kwargs), **LOOPS[loop])
    _close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert int(opt.param_groups[0]["step"]) == int(ref.param_groups[0]["step"])


@pytest.mark.parametrize("name, flags", [("sgd", dict(momentum=0.9)), ("lars", {}), ("adamw", dict(fused=True)),
                                         ("lamb", dict(capturable=True))], ids=["sgd", "lars", "adamw", "lamb"])
def test_a_group_without_gradients_beside_one_with_takes_the_scaler_in_the_kernels(name, flags):
    """A group whose parameters took no gradient this step (a backbone with requires_grad=False, not marked frozen)
    plans no tensor: it raised IndexError where the scaler's tensors were placed on its first parameter's device
    (a helper found it). The kernel route equals the reference's host route; LAMB counts the idle group's step."""
    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        head, backbone = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).requires_grad_(False)
        kwargs = {k: v for k, v in flags.items() if not (backend == "reference" and k == "fused")}
        opt = OPTIMIZERS[name].cls([{"params": head.parameters()}, {"params": backbone.parameters()}], lr=0.1,
                                   backend=backend, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for i in range(3):
            x = torch.randn(2, 4, generator=torch.Generator().manual_seed(i))
            scaler.scale(head(x).square().sum() * (INF if i == 1 else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs.append((head, opt))
    (ref_head, ref_opt), (head, opt) = runs
    for p, q in zip(head.parameters(), ref_head.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if name == "lamb":
        assert [int(g["step"]) for g in opt.param_groups] == [int(g["step"]) for g in ref_opt.param_groups] == [2, 2]


@pytest.mark.parametrize("name, flags", [("adamw", dict(capturable=True)), ("lamb", dict(capturable=True))])
def test_a_found_inf_summed_over_two_devices_takes_back_one_step(name, flags):
    """GradScaler sums the devices' flags: found_inf 2.0 is one skipped step (torch's fused AdamW takes back 2)."""
    model = _model()
    opt = OPTIMIZERS[name].cls(model.parameters(), backend="triton", **flags)
    for found_inf in (0.0, 2.0, 0.0):
        model(torch.ones(2, 8)).sum().backward()
        opt.grad_scale, opt.found_inf = torch.ones(1), torch.full((1,), found_inf)
        opt.step()
        del opt.grad_scale, opt.found_inf
        opt.zero_grad()
    counts = [opt.param_groups[0]["step"]] if name == "lamb" else [opt.state[p]["step"] for p in model.parameters()]
    assert all(int(c) == 2 for c in counts)
