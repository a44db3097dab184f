"""capturable=True (torch.optim.AdamW's meaning): step counts on the parameters' device, bias corrections
computed there, so that a CUDA graph can capture the step; and which steps a capture accepts.

No GPU here, so no graph is captured or replayed (``python -m benchmarks.gpu_check``, section ``replay``,
does that on a GPU). What the CPU can show:

- without a capture, capturable=True gives the numbers of capturable=False, on every backend (the triton
  kernels compute the corrections in fp64 from the device counts; the host path in Python doubles), while a
  scheduler changes a tensor lr;
- a capturable step reads nothing on the host from the tensors a CUDA run keeps on the device (what a graph
  cannot do, and what would be a sync), the tensor lr included;
- inside a capture (torch's capture query answered yes), a warm triton step is accepted, and every step
  a replay would get wrong is refused before any change, saying why;
- checkpoints move both ways between capturable and torch's AdamW.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fused_ft import AdamW
from fused_ft.optim import _base
from fused_ft.testing.specs import OPTIMIZERS
from tests.test_grad_scaler import _HostRead, _device_tensors, no_host_reads  # noqa: F401  (a fixture)

BACKENDS = ["reference", "cpu", "triton"]


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _loss(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    return ((model(x.to(model[0].weight.dtype)).float() - y) ** 2).mean()


def _train(model, opt, steps: int, scheduler=None) -> None:
    for _ in range(steps):
        _loss(model).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


VARIANTS = {
    "tensor-lr-scheduled": (AdamW, dict(lr=torch.tensor(3e-3), weight_decay=0.1, betas=(0.8, 0.99))),
    "amsgrad-maximize": (AdamW, dict(lr=1e-3, amsgrad=True, maximize=True)),
    "bf16-nearest": (AdamW, dict(lr=1e-2, dtype=torch.bfloat16)),
    "lamb-clip": (OPTIMIZERS["lamb"].cls, dict(lr=1e-2, max_grad_norm=0.5, betas=(0.8, 0.99))),
    "lamb-no-bias-correction": (OPTIMIZERS["lamb"].cls, dict(lr=1e-2, bias_correction=False, trust_clip=True)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_gives_the_numbers_of_capturable_false(backend, variant):
    cls, kwargs = VARIANTS[variant]
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", torch.float32)
    runs = []
    for capturable in (False, True):
        model = _model(dtype)
        lr = kwargs["lr"].clone() if isinstance(kwargs["lr"], torch.Tensor) else kwargs["lr"]
        opt = cls(model.parameters(), **{**kwargs, "lr": lr}, capturable=capturable, backend=backend)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 30) if variant == "tensor-lr-scheduled" else None
        _train(model, opt, 30, scheduler)
        runs.append((model, opt))
    (plain, _), (captured, opt) = runs
    for p, q in zip(plain.parameters(), captured.parameters()):
        assert torch.equal(p, q)
        step = opt.param_groups[0]["step"] if cls is not AdamW else opt.state[q]["step"]
        assert step.item() == 30 and step.device == q.device


def test_capturable_with_mixed_dtypes_and_unequal_step_counts_gives_the_numbers_of_false():
    """One group of fp32 and bf16 parameters (a launch per dtype, each with its own rows of step counts), one
    of which joins later (its count lags): still the numbers of capturable=False, on the triton backend."""
    runs = []
    for capturable in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(40, dtype=d)) for d in (torch.float32, torch.bfloat16) * 2]
        opt = AdamW(params, lr=1e-2, capturable=capturable, backend="triton")
        for step in range(6):
            for i, p in enumerate(params):
                p.grad = None if (i == 3 and step < 3) else torch.randn(40, generator=torch.Generator().manual_seed(
                    step * 10 + i)).to(p.dtype)
            opt.step()
        runs.append(params)
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_a_float64_step_count_is_read_as_fp32_where_the_kernels_read_it():
    """torch writes float64 step counts under torch.set_default_dtype(torch.float64), and fused_ft loads them: a
    capturable (or fused) group moves them to fp32 on the device, which the kernels read (they read NaNs from
    the float64 bits before)."""
    runs = []
    for flags in ({}, dict(capturable=True), dict(fused=True)):
        model = _model()
        opt = AdamW(model.parameters(), lr=1e-2, backend="triton", **flags)
        _train(model, opt, 2)
        for state in opt.state.values():
            state["step"] = state["step"].to(torch.float64)
        _train(model, opt, 3)
        runs.append(model)
    for model in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), model.parameters()))


@pytest.mark.parametrize("name, kwargs", [("adamw", dict(lr=torch.tensor(1e-3), capturable=True)),
                                          ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
                                          ("lars", dict(lr=0.5, momentum=0.9, weight_decay=1e-4)),
                                          ("lamb", dict(lr=1e-3, capturable=True))],
                         ids=["adamw", "sgd", "lars", "lamb"])
def test_a_warm_triton_step_reads_nothing_on_the_host(name, kwargs, no_host_reads):  # noqa: F811
    """What a CUDA graph replays is the device work: a value read on the host would be baked in (and is a sync).
    The first step creates state on the host; the next ones read no device tensor there. The cpu backend's
    reference backend reads the tensor lr, which the same guard catches."""
    model = _model()
    opt = OPTIMIZERS[name].cls(model.parameters(), backend="triton", **kwargs)
    _train(model, opt, 1)
    for _ in range(2):
        _loss(model).backward()
        no_host_reads["guarded"] = _device_tensors(opt) | {kwargs["lr"].untyped_storage().data_ptr()
                                                           if isinstance(kwargs["lr"], torch.Tensor) else 0} | {
            g["step"].untyped_storage().data_ptr() for g in opt.param_groups if "step" in g}
        opt.step()
        no_host_reads["guarded"] = set()
        opt.zero_grad()
    if name == "adamw":
        model, lr = _model(), torch.tensor(1e-3)
        host = AdamW(model.parameters(), lr=lr, capturable=True, backend="reference")
        _train(model, host, 1)
        _loss(model).backward()
        no_host_reads["guarded"] = _device_tensors(host) | {lr.untyped_storage().data_ptr()}
        with pytest.raises(_HostRead):
            host.step()


@pytest.mark.parametrize("flags", [dict(capturable=True), dict(fused=True), dict(lamb=True)],
                         ids=["capturable", "fused", "lamb-capturable"])
def test_a_warm_capturable_step_is_accepted_inside_a_capture_and_equals_an_eager_one(flags, monkeypatch):
    """capturable=True, and fused=True, whose step counts live on the device too (torch refuses the latter);
    LAMB with capturable=True (its group step on the device)."""
    models = [_model(), _model()]
    if flags.pop("lamb", False):
        opts = [OPTIMIZERS["lamb"].cls(m.parameters(), lr=1e-3, capturable=True, backend="triton") for m in models]
    else:
        opts = [AdamW(m.parameters(), lr=torch.tensor(1e-3), backend="triton", **flags) for m in models]
    for model, opt in zip(models, opts):
        _train(model, opt, 1)  # the warm-up step: state exists
    _loss(models[1]).backward()
    opts[1].step()
    _capture(monkeypatch)
    _loss(models[0]).backward()
    opts[0].step()  # "captured": accepted
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


def _capture(monkeypatch) -> None:
    """From now on a CUDA stream is capturing, as far as fused_ft's query says (torch.optim's are not asked)."""
    monkeypatch.setattr(_base, "_cuda_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


REFUSALS = {
    "cpu-backend": (AdamW, dict(lr=1e-3, capturable=True, backend="cpu"), 1, r"group 0 runs the 'cpu' backend"),
    "not-capturable": (AdamW, dict(lr=1e-3, backend="triton"), 1, r"group 0 keeps its step counts on the host "
                                                                    r"\(capturable=False\).*pass capturable=True"),
    "first-step": (AdamW, dict(lr=1e-3, capturable=True, backend="triton"), 0,
                   r"group 0 has parameters without optimizer state yet.*run one step before capturing"),
    "stochastic": (AdamW, dict(lr=1e-3, capturable=True, backend="triton", bf16_update="stochastic"), 1,
                   r"group 0 uses bf16_update='stochastic'"),
    "sgd-tensor-lr": (OPTIMIZERS["sgd"].cls, dict(lr=torch.tensor(0.1), momentum=0.9, backend="triton"), 1,
                      r"group 0 has a tensor lr, which the step reads on the host; pass a float"),
    "lamb": (OPTIMIZERS["lamb"].cls, dict(lr=1e-3, backend="triton"), 1, r"group 0 counts its step in the group on "
                                                                         r"the host, as timm's Lamb does.*pass "
                                                                         r"capturable=True"),
    "amsgrad-turned-on": (AdamW, dict(lr=1e-3, capturable=True, backend="triton"), 1,
                          r"group 0 has parameters without optimizer state yet"),
    "tensor-betas": (AdamW, dict(lr=1e-3, capturable=True, backend="triton"), 1,
                     r"group 0 has tensors in betas, which the step reads on the host"),
    "lamb-no-bias-correction": (OPTIMIZERS["lamb"].cls, dict(lr=1e-3, bias_correction=False, backend="triton"), 1,
                                r"group 0 counts its step in the group on the host"),
    "lamb-loaded-count": (OPTIMIZERS["lamb"].cls, dict(lr=1e-3, capturable=True, backend="triton"), 1,
                          r"group 0 has its step count on the host still"),
    "sgd-scaler-dampening-first-step": (OPTIMIZERS["sgd"].cls, dict(lr=0.1, momentum=0.9, dampening=0.5,
                                                                    backend="triton"), 0,
                                        r"group 0 has parameters without optimizer state yet"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_step_a_replay_would_get_wrong_is_refused_before_any_change(case, monkeypatch):
    cls, kwargs, warm, message = REFUSALS[case]
    model = _model(torch.bfloat16 if case == "stochastic" else torch.float32)
    opt = cls(model.parameters(), **kwargs)
    _train(model, opt, warm)
    if case == "amsgrad-turned-on":
        opt.param_groups[0]["amsgrad"] = True  # its running maximum is created by the next step, on the host
    if case == "tensor-betas":
        opt.param_groups[0]["betas"] = (torch.tensor(0.9), torch.tensor(0.999))
    if case == "lamb-loaded-count":  # a checkpoint's count comes back on the CPU, away from CUDA parameters (here:
        opt.param_groups[0]["step"] = opt.param_groups[0]["step"].to("meta")  # another device than the CPU's)
    _loss(model).backward()
    before = ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))
    _capture(monkeypatch)
    with pytest.raises(RuntimeError, match=rf"^Invalid CUDA graph capture of {cls.__name__}'s step\(\): {message}.*"
                                           r"call step\(\) outside the graph$"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before[0]))
    assert str(opt.state_dict()) == str(before[1])


def test_a_capture_that_would_read_the_scalers_found_inf_on_the_host_is_refused(monkeypatch):
    """Every step a capture accepts takes GradScaler's tensors in its kernels today; one whose second group would
    take the host route (here made so) is refused, naming that group, where its found_inf.item() would fail."""
    model = _model()
    opt = AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-3, capturable=True,
                backend="triton")
    _train(model, opt, 1)
    _loss(model).backward()
    in_kernel = opt._scaler_in_kernel
    monkeypatch.setattr(opt, "_scaler_in_kernel", lambda plan: in_kernel(plan) and plan.group is opt.param_groups[0])
    opt.grad_scale, opt.found_inf = torch.ones(1), torch.zeros(1)
    _capture(monkeypatch)
    with pytest.raises(RuntimeError, match=r"group 1 takes GradScaler's found_inf on the host"):
        opt.step()


# name -> (the other library's optimizer, fused_ft's capturable one, the group key that holds the step)
CHECKPOINT_PAIRS = {
    # the reference backend equals torch bit for bit, so the halves may come from either
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
              lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.05, capturable=True, backend="reference")),
    # LAMB's group step: a tensor on the device with capturable, a CPU tensor in timm's (the triton kernels)
    "lamb": (lambda ps: OPTIMIZERS["lamb"].reference(ps, lr=1e-2),
             lambda ps: OPTIMIZERS["lamb"].cls(ps, lr=1e-2, capturable=True, backend="triton")),
}


@pytest.mark.parametrize("saved_by", ["theirs", "capturable"])
@pytest.mark.parametrize("name", list(CHECKPOINT_PAIRS))
def test_checkpoints_move_between_capturable_and_torch_or_timm(name, saved_by):
    """5 steps, saved, loaded into the other, 5 more: equal to 10 steps of the loader alone."""
    make = dict(zip(("theirs", "capturable"), CHECKPOINT_PAIRS[name]))
    loaded_by = "capturable" if saved_by == "theirs" else "theirs"
    model = _model()
    saver = make[saved_by](model.parameters())
    _train(model, saver, 5)
    loader = make[loaded_by](model.parameters())
    loader.load_state_dict(copy.deepcopy(saver.state_dict()))
    if loaded_by == "theirs" and name == "adamw":
        loader.param_groups[0]["capturable"] = False  # torch takes the saver's flags; steps capturable on a GPU only
    _train(model, loader, 5)
    alone = _model()
    _train(alone, make[loaded_by](alone.parameters()), 10)
    tol = dict(rtol=0, atol=0) if name == "adamw" else dict(rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, **tol)
    if loaded_by == "capturable":
        steps = [loader.state[p]["step"] for p in model.parameters()] if name == "adamw" else [
            loader.param_groups[0]["step"]]
        assert all(int(t) == 10 and t.device == model[0].weight.device for t in steps)
        assert loader.param_groups[0]["capturable"] is True  # the loader keeps its own flag
