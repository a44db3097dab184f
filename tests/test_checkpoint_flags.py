"""Checkpoints across implementations: a torch.optim state dict saved with ``fused``, ``foreach``,
``capturable`` or ``differentiable`` set loads into fused_ft and continues on any backend as torch's own
resume does, and torch continues from fused_ft's dict. An implementation flag says how the saver ran,
not how the loader must run: the loading optimizer keeps its own.

Before: a ``torch.optim.AdamW(fused=True)`` checkpoint loaded without complaint, and every later
``step()`` on the reference backend failed with "Invalid fused=True ... pass fused=None", an argument the
user never gave; a CUDA ``capturable=True`` checkpoint failed so on every backend.
"""
import io

import pytest
import torch

import fused_ft
from tests.helpers import twin

FLAGS = {
    "sgd": [dict(fused=True), dict(foreach=True), dict(foreach=False), dict(differentiable=True)],
    "adamw": [dict(fused=True), dict(foreach=True), dict(foreach=False), dict(differentiable=True),
              dict(capturable=True)],
}
KWARGS = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3), "adamw": dict(lr=1e-2, weight_decay=0.05)}
TORCH = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
OURS = {"sgd": fused_ft.SGD, "adamw": fused_ft.AdamW}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _groups(model):
    return [{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias], "lr": 0.02}]


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        x = torch.randn(8, 6, generator=g)
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=g)).backward()
        opt.step()


def _through_a_file(state_dict):
    """A copy as a reader of a checkpoint file gets it (torch's load_state_dict keeps the dict's state
    tensors where it can, so two optimizers loading one dict would share momentum buffers)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu")


def _torch_checkpoint(name, flags):
    """A torch.optim checkpoint saved with ``flags`` after 3 steps, and the model it belongs to. CPU
    torch refuses capturable steps, so a capturable checkpoint is made as CUDA's looks: the flag set and
    each step count a float32 tensor on the parameter's device. torch's differentiable=True cannot step
    leaf parameters, so that flag is set in the dict too (as a differentiable run's checkpoint has it)."""
    model = _model()
    saver_flags = {} if flags.get("capturable") or flags.get("differentiable") else flags
    opt = TORCH[name](_groups(model), **KWARGS[name], **saver_flags)
    _steps(model, opt, 3, seed=1)
    state_dict = opt.state_dict()
    if flags.get("capturable") or flags.get("differentiable"):
        for group in state_dict["param_groups"]:
            group.update(flags)
    if flags.get("capturable"):
        for entry in state_dict["state"].values():
            entry["step"] = entry["step"].to(torch.float32)
    return model, _through_a_file(state_dict)


def _for_loop_resume(name, model, state_dict, steps):
    """torch's own resume, made to run its for-loop (the reference backend's bits)."""
    opt = TORCH[name](_groups(model), **KWARGS[name])
    opt.load_state_dict(_through_a_file(state_dict))
    for group in opt.param_groups:
        group.update(fused=None, foreach=False, differentiable=False)
        if "capturable" in group:
            group["capturable"] = False
    _steps(model, opt, steps, seed=2)
    return model


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name,flags", [(n, f) for n, fs in FLAGS.items() for f in fs],
                         ids=[f"{n}-{next(iter(f))}={next(iter(f.values()))}" for n, fs in FLAGS.items() for f in fs])
def test_a_torch_checkpoint_with_any_implementation_flag_continues_in_fused_ft(name, flags, backend):
    saved_model, state_dict = _torch_checkpoint(name, flags)
    expected = _for_loop_resume(name, twin(saved_model), state_dict, 3)
    model = twin(saved_model)
    opt = OURS[name](_groups(model), **KWARGS[name], backend=backend)
    before = [dict((k, g[k]) for k in ("fused", "foreach", "differentiable") if k in g) for g in opt.param_groups]
    opt.load_state_dict(_through_a_file(state_dict))
    assert [dict((k, g[k]) for k in ("fused", "foreach", "differentiable") if k in g)
            for g in opt.param_groups] == before  # its own flags, not the saver's
    assert all(not g.get("capturable", False) for g in opt.param_groups)
    assert opt.param_groups[1]["lr"] == 0.02 and opt.param_groups[0]["lr"] == KWARGS[name]["lr"]
    _steps(model, opt, 3, seed=2)
    for p, q in zip(model.parameters(), expected.parameters()):
        if backend == "reference":
            assert torch.equal(p, q)
        else:  # the C++ kernels round differently: close, over 3 steps of a well-conditioned problem
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# torch on the CPU steps neither capturable=True nor differentiable=True leaf parameters, whatever it loads
RUNNABLE = [(n, f) for n, fs in FLAGS.items() for f in fs if not (f.get("capturable") or f.get("differentiable"))]


@pytest.mark.parametrize("name,flags", RUNNABLE,
                         ids=[f"{n}-{next(iter(f))}={next(iter(f.values()))}" for n, f in RUNNABLE])
def test_torch_with_any_implementation_flag_continues_from_a_fused_ft_checkpoint(name, flags):
    model = _model()
    ours = OURS[name](_groups(model), **KWARGS[name], backend="reference")
    _steps(model, ours, 3, seed=1)
    state_dict = _through_a_file(ours.state_dict())
    resumed = twin(model)
    theirs = TORCH[name](_groups(resumed), **KWARGS[name], **flags)
    theirs.load_state_dict(state_dict)
    _steps(resumed, theirs, 3, seed=2)
    _steps(model, ours, 3, seed=2)
    for p, q in zip(resumed.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
