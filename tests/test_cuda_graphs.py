"""CUDA graphs: a step that a replay would get wrong is refused while a stream captures, as torch.optim
refuses a capturable=False step (``Optimizer._cuda_graph_capture_health_check``).

On an H200, a captured ``fused_ft.AdamW`` step was accepted: the step count and bias corrections are
host values baked into the graph, so after 5 replays ``state["step"]`` read 2 where torch's read 6 and
the weights were 4e-3 away. No GPU here: torch's capture query is replaced, for fused_ft and for
torch.optim alike.
"""
import pytest
import torch

from fused_ft.optim import _base
from fused_ft.testing.specs import OPTIMIZERS


class _CapturingStream:
    def is_capturing(self) -> bool:
        return True


@pytest.fixture
def capturing(monkeypatch):
    """A CUDA stream is capturing, as far as torch's queries say: torch.cuda's (fused_ft's, and older torch.optim's)
    and torch.accelerator's (torch.optim's in the pinned torch)."""
    monkeypatch.setattr(_base, "_cuda_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    if hasattr(torch, "accelerator"):
        cuda = torch.device("cuda")
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: cuda)
        monkeypatch.setattr(torch.accelerator, "current_stream", lambda device=None: _CapturingStream())


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def test_torch_optim_refuses_the_same_capture(capturing):
    """The replaced query is the one torch.optim asks: its own AdamW (capturable=False) refuses."""
    model = _model()
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="capturable"):
        torch.optim.AdamW(model.parameters()).step()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_a_step_inside_a_capture_is_refused_before_any_change(opt_name, capturing):
    spec = OPTIMIZERS[opt_name]
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = spec.cls(model.parameters(), **next(iter(spec.variants.values())))
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=rf"^Invalid CUDA graph capture of {spec.cls.__name__}'s step\(\): .*"
                                           r"call step\(\) outside the graph$"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_a_step_in_backward_inside_a_capture_is_refused_before_any_change(opt_name, capturing):
    spec = OPTIMIZERS[opt_name]
    kwargs = dict(next(iter(spec.variants.values())))
    if opt_name == "lamb":
        kwargs["max_grad_norm"] = None  # global clipping is refused with step_in_backward
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = spec.cls(model.parameters(), **kwargs, step_in_backward=True)
    with pytest.raises(RuntimeError, match=r"Invalid CUDA graph capture of .* step_in_backward update: .*"
                                           r"use step_in_backward=False"):
        model(torch.randn(3, 4)).sum().backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state


def test_without_a_capture_the_step_runs(monkeypatch):
    """The check asks the capture query: a CUDA machine that is not capturing steps as usual."""
    monkeypatch.setattr(_base, "_cuda_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = OPTIMIZERS["adamw"].cls(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
