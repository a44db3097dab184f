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
    "tensor-lr-scheduled": dict(lr=torch.tensor(3e-3), weight_decay=0.1, betas=(0.8, 0.99)),
    "amsgrad-maximize": dict(lr=1e-3, amsgrad=True, maximize=True),
    "bf16-nearest": dict(lr=1e-2, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_gives_the_numbers_of_capturable_false(backend, variant):
    kwargs = dict(VARIANTS[variant])
    dtype = kwargs.pop("dtype", torch.float32)
    runs = []
    for capturable in (False, True):
        model = _model(dtype)
        lr = kwargs["lr"].clone() if isinstance(kwargs["lr"], torch.Tensor) else kwargs["lr"]
        opt = AdamW(model.parameters(), **{**kwargs, "lr": lr}, capturable=capturable, backend=backend)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 30) if variant == "tensor-lr-scheduled" else None
        _train(model, opt, 30, scheduler)
        runs.append((model, opt))
    (plain, _), (captured, opt) = runs
    for p, q in zip(plain.parameters(), captured.parameters()):
        assert torch.equal(p, q)
        assert opt.state[q]["step"].item() == 30 and opt.state[q]["step"].device == q.device


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
                                          ("lars", dict(lr=0.5, momentum=0.9, weight_decay=1e-4))],
                         ids=["adamw", "sgd", "lars"])
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
                                                           if isinstance(kwargs["lr"], torch.Tensor) else 0}
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


@pytest.mark.parametrize("flags", [dict(capturable=True), dict(fused=True)], ids=["capturable", "fused"])
def test_a_warm_capturable_step_is_accepted_inside_a_capture_and_equals_an_eager_one(flags, monkeypatch):
    """capturable=True, and fused=True, whose step counts live on the device too (torch refuses the latter)."""
    models = [_model(), _model()]
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
                                                                         r"the host, as timm's Lamb does"),
    "amsgrad-turned-on": (AdamW, dict(lr=1e-3, capturable=True, backend="triton"), 1,
                          r"group 0 has parameters without optimizer state yet"),
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
    _loss(model).backward()
    before = ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))
    _capture(monkeypatch)
    with pytest.raises(RuntimeError, match=rf"^Invalid CUDA graph capture of {cls.__name__}'s step\(\): {message}.*"
                                           r"call step\(\) outside the graph$"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before[0]))
    assert str(opt.state_dict()) == str(before[1])


@pytest.mark.parametrize("direction", ["torch-to-capturable", "capturable-to-torch"])
def test_checkpoints_move_between_capturable_and_torchs_adamw(direction):
    """10 steps, saved, loaded into the other, 10 more: equal to 20 steps of the loader alone (the reference
    backend equals torch bit for bit, so the two halves may come from either)."""
    kwargs = dict(lr=1e-2, weight_decay=0.05)
    make = {"torch": lambda ps: torch.optim.AdamW(ps, **kwargs),
            "capturable": lambda ps: AdamW(ps, **kwargs, capturable=True, backend="reference")}
    first, second = direction.split("-to-")
    model = _model()
    saver = make[first](model.parameters())
    _train(model, saver, 10)
    loader = make[second](model.parameters())
    loader.load_state_dict(copy.deepcopy(saver.state_dict()))
    if second == "torch":  # torch takes the saver's flags; it steps capturable=True on a GPU only
        loader.param_groups[0]["capturable"] = False
    _train(model, loader, 10)
    alone = _model()
    _train(alone, make[second](alone.parameters()), 20)
    for p, q in zip(model.parameters(), alone.parameters()):
        assert torch.equal(p, q)
    if second == "capturable":
        assert all(loader.state[p]["step"].device == p.device for p in model.parameters())
        assert loader.param_groups[0]["capturable"] is True  # the loader keeps its own flag


def test_a_capture_that_would_read_the_scalers_found_inf_on_the_host_is_refused(monkeypatch):
    """Every step a capture accepts takes GradScaler's tensors in its kernels today; one that would take the host
    route (here made so) is refused, where its found_inf.item() would fail inside the capture."""
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-3, capturable=True, backend="triton")
    _train(model, opt, 1)
    _loss(model).backward()
    monkeypatch.setattr(opt, "_scaler_in_kernel", lambda plan: False)
    opt.grad_scale, opt.found_inf = torch.ones(1), torch.zeros(1)
    _capture(monkeypatch)
    with pytest.raises(RuntimeError, match=r"group 0 takes GradScaler's found_inf on the host"):
        opt.step()
