"""step_in_backward: the same trajectories as a normal step, and clear refusals.

Catches: a hook that ignores its group's ``frozen`` flag (a frozen group whose parameters still take
gradients gets updated during backward), a hook that plans a parameter with another group's
hyperparameters, a scheduler's or an unfreeze's change that the hooks miss, gradients that are not
freed in backward, hooks that outlive their optimizer.
"""
from __future__ import annotations

import pytest
import torch

import fused_ft
from fused_ft.testing.specs import OPTIMIZERS
from tests.helpers import assert_close_tensorwise, batches, freed_in_backward, make_model, train_step, twin

CASES = {"sgd": dict(lr=0.05, momentum=0.9), "sgd-nomom": dict(lr=0.05), "adamw": dict(lr=1e-3),
         "lars": dict(lr=0.5, momentum=0.9, weight_decay=1e-4), "lamb": dict(lr=1e-3, max_grad_norm=None)}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_equals_normal_step(case, backend):
    cls = OPTIMIZERS[case.split("-")[0]].cls
    model = make_model("vit_tiny_patch16_224")
    model.patch_embed.requires_grad_(False)  # frozen, as create_optimizer does
    other = twin(model)
    groups = lambda m: [{"params": [p for n, p in m.named_parameters() if not n.startswith("patch_embed")]},  # noqa: E731
                        {"params": list(m.patch_embed.parameters()), "frozen": True}]
    normal = cls(groups(model), backend=backend, **CASES[case])
    inside = cls(groups(other), backend=backend, step_in_backward=True, **CASES[case])
    scheduler = torch.optim.lr_scheduler.StepLR(inside, step_size=1, gamma=0.5)
    scheduler_ref = torch.optim.lr_scheduler.StepLR(normal, step_size=1, gamma=0.5)
    for x, y in batches(3):
        train_step(model, normal, x, y)
        train_step(other, inside, x, y)
        scheduler.step()
        scheduler_ref.step()
        assert freed_in_backward(inside)
    for (n, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(model.parameters(), other.parameters()):
        for key, value in normal.state[a].items():
            assert torch.equal(value, inside.state[b][key])


def test_refusals():
    model = make_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"Invalid step_in_backward=True with max_grad_norm=1\.0"):
        fused_ft.LAMB(model.parameters(), step_in_backward=True)
    with pytest.raises(TypeError, match=r"Invalid step_in_backward: 'yes'"):
        fused_ft.SGD(model.parameters(), step_in_backward="yes")
    opt = fused_ft.SGD(model.parameters(), lr=0.1, step_in_backward=True)
    scaler = torch.amp.GradScaler("cpu")
    x, y = next(batches(1))
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError, match=r"Invalid use with torch.amp.GradScaler"):
        scaler.step(opt)


def test_parameters_unfrozen_later_update_and_dropped_optimizers_stop():
    model = make_model("vit_tiny_patch16_224")
    probe = fused_ft.create_optimizer(model, "linear-probe", lr=0.1, step_in_backward=True)
    x, y = next(batches(1))
    train_step(model, probe, x, y)
    del probe  # LP-FT: the probe's optimizer is gone; its hooks must not touch the head any more
    finetune = fused_ft.create_optimizer(model, "sgd-freeze-embed", lr=0.05, step_in_backward=True)
    reference = twin(model)
    normal = fused_ft.create_optimizer(reference, "sgd-freeze-embed", lr=0.05)
    for x, y in batches(2):
        train_step(model, finetune, x, y)
        train_step(reference, normal, x, y)
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), n  # blocks unfrozen after the probe were updated, the head only once per step


# Per group: (lr, weight decay, momentum or betas). Group 2 differs in everything from group 0; for
# plain SGD, momentum differs too (0.9 / 0.5 / none).
GROUP_HYPER = {
    "sgd": [dict(lr=0.05, weight_decay=0.0, momentum=0.9), dict(lr=0.02, weight_decay=1e-2, momentum=0.5),
            dict(lr=0.1, weight_decay=1e-3, momentum=0.0)],
    "sgd-nomom": [dict(lr=0.05), dict(lr=0.02, weight_decay=1e-2), dict(lr=0.1, weight_decay=1e-3)],
    "adamw": [dict(lr=1e-3), dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99)),
              dict(lr=5e-4, weight_decay=0.0, betas=(0.95, 0.9))],
    "lars": [dict(lr=0.5, momentum=0.9, weight_decay=1e-4), dict(lr=0.2, momentum=0.5, weight_decay=1e-3),
             dict(lr=1.0, momentum=0.0, weight_decay=1e-2)],
    "lamb": [dict(lr=1e-3), dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99)),
             dict(lr=5e-4, weight_decay=0.0, betas=(0.95, 0.9))],
}
DEFAULTS = {"lamb": dict(max_grad_norm=None)}  # timm's clip is global, read from the defaults
STEPS, UNFREEZE_AT = 6, 3


class _Net(torch.nn.Module):
    """Five parameter groups' worth of layers, small enough for Triton's interpreter."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.LayerNorm(16)
        self.c = torch.nn.Linear(16, 16)
        self.frozen = torch.nn.Linear(16, 16)  # frozen=True, but its parameters keep requires_grad
        self.later = torch.nn.Linear(16, 16)  # frozen and without gradients until UNFREEZE_AT
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.later(self.frozen(self.c(self.b(self.a(x)).relu()).relu())))


def _groups(net, case):
    g0, g1, g2 = GROUP_HYPER[case]
    net.later.requires_grad_(False)
    return [{"params": list(net.a.parameters()), **g0}, {"params": list(net.b.parameters()), **g1},
            {"params": [*net.c.parameters(), *net.head.parameters()], **g2},
            {"params": list(net.frozen.parameters()), "frozen": True},
            {"params": list(net.later.parameters()), "frozen": True}]


def _run(case, backend, step_in_backward):
    torch.manual_seed(0)
    net = _Net()
    opt = OPTIMIZERS[case.split("-")[0]].cls(_groups(net, case), backend=backend, step_in_backward=step_in_backward,
                                             **DEFAULTS.get(case, {}))
    # the scheduler changes group 1's learning rate only, mid-run
    lr_factors = [lambda s: 1.0, lambda s: 1.0 if s < 2 else 0.3] + [lambda s: 1.0] * 3
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factors)
    frozen_start = [p.detach().clone() for p in net.frozen.parameters()]
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        if step == UNFREEZE_AT:  # gradual unfreezing: the group takes gradients and updates from here on
            net.later.requires_grad_(True)
            opt.param_groups[4]["frozen"] = False
        x, y = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        schedule.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen_start, net.frozen.parameters()))  # frozen, with grads
    assert not any(p in opt.state for p in net.frozen.parameters())
    return net, opt


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", list(GROUP_HYPER))
def test_groups_schedules_frozen_and_unfrozen_groups_match_a_normal_step(case, backend):
    """Three groups with their own lr, weight decay and momentum or betas; a frozen group whose
    parameters keep requires_grad; a scheduler that changes one group's lr mid-run; a group unfrozen
    mid-run. Bit for bit on the reference backend, to the kernels' tolerance elsewhere (each hook
    launches for one tensor, a normal step for the whole list)."""
    normal_net, normal = _run(case, backend, step_in_backward=False)
    inside_net, inside = _run(case, backend, step_in_backward=True)
    tol = OPTIMIZERS[case.split("-")[0]].reference_rtol
    torch.manual_seed(0)  # _run's seed: the unfrozen group's starting weights, which must have moved
    later_start = _Net().later.weight
    assert not torch.equal(normal_net.later.weight, later_start)
    for (name, a), b in zip(normal_net.named_parameters(), inside_net.parameters()):
        if backend == "reference":
            assert torch.equal(a, b), name
        else:
            assert_close_tensorwise(b, a, rtol=tol, what=name)
    for a, b in zip(normal_net.parameters(), inside_net.parameters()):
        assert normal.state[a].keys() == inside.state[b].keys()
        for key, value in normal.state[a].items():
            if backend == "reference":
                assert torch.equal(value, inside.state[b][key]), key
            else:
                assert_close_tensorwise(inside.state[b][key], value, rtol=tol, what=key)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_closure_runs_and_its_backward_makes_the_update_as_torch_step_would(case, backend):
    """Lightning passes a closure to every step(): it runs (forward, zero_grad, backward), the hooks update
    during its backward, and step() returns its loss. The oracle is the same optimizer without
    step_in_backward stepping with the same closure, and torch.optim's SGD for SGD."""
    name = case.split("-")[0]
    cls = OPTIMIZERS[name].cls
    models = {kind: make_model("vit_tiny_patch16_224") for kind in ("inside", "normal", "torch")}
    inside = cls(models["inside"].parameters(), backend=backend, step_in_backward=True, **CASES[case])
    normal = cls(models["normal"].parameters(), backend=backend, **CASES[case])
    optimizers = {"inside": inside, "normal": normal}
    if name == "sgd" and backend == "reference":  # bit for bit with torch's for-loop (the kernels round otherwise)
        optimizers["torch"] = torch.optim.SGD(models["torch"].parameters(), **CASES[case])
    for x, y in batches(3):
        losses = {}
        for kind, opt in optimizers.items():
            model = models[kind]

            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            losses[kind] = opt.step(closure)
        assert len({float(v.detach()) for v in losses.values()}) == 1, losses
        assert all(p.grad is None for p in models["inside"].parameters())  # updated, and freed by step()
    for kind in optimizers:
        for (n, a), b in zip(models["inside"].named_parameters(), models[kind].parameters()):
            assert torch.equal(a, b), (kind, n)


@pytest.mark.parametrize("mode", ["plain", "step_in_backward", "step_in_backward-bucket-per-parameter"])
def test_a_sparse_gradient_is_refused_naming_its_parameter(mode):
    """nn.Embedding(sparse=True) gives a sparse gradient, which no fused_ft backend takes. Without
    step_in_backward the refusal comes before any change; with it, from the embedding's hook, naming the
    parameter by its place in its group (it named the wrong one: a hook planned a one-parameter list), before
    any change while this backward's gradients wait in the bucket, and saying so where a bucket was applied."""
    torch.manual_seed(0)
    embed, head = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2)
    extra = torch.nn.Parameter(torch.zeros(3))  # no gradient: the embedding is param 1 of group 1
    opt = fused_ft.SGD([{"params": list(head.parameters())}, {"params": [extra, embed.weight]}], lr=0.1,
                       step_in_backward=mode != "plain")
    if mode.endswith("per-parameter"):
        opt.bucket_bytes = 1
    head(torch.ones(1, 4)).sum().backward()  # a first iteration without the embedding: step() checks the loop
    opt.step()
    before = [t.detach().clone() for t in (embed.weight, head.weight)]
    note = (r"\); with step_in_backward=True, buckets of parameters whose gradients came earlier"
            if mode.endswith("per-parameter") else r"\)$")
    with pytest.raises(ValueError, match=r"^Invalid grad: group 1 param 1 \(shape \(10, 4\)\) has a sparse gradient; "
                                         r".*nn\.Embedding\(sparse=False\), .*SparseAdam for sparse ones" + note):
        head(embed(torch.tensor([1, 2, 3]))).sum().backward()
        opt.step()
    assert torch.equal(embed.weight, before[0])
    if not mode.endswith("per-parameter"):  # nothing applied before the refusal
        assert torch.equal(head.weight, before[1]) and not opt.state[embed.weight]


def test_several_ranks_are_refused_at_the_first_hook_before_any_change(monkeypatch):
    """DDP all-reduces a gradient after it accumulates, so a hook would apply the rank's local gradient:
    2 gloo ranks with DDP drifted 1e-2 apart in 3 steps, with no error. Refused at the first hook (the
    process group is replaced: 2 ranks as far as torch.distributed's queries say)."""
    model = make_model("vit_tiny_patch16_224")
    opt = fused_ft.SGD(model.parameters(), lr=0.1, step_in_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    x, y = next(batches(1))
    with pytest.raises(RuntimeError, match=r"^Invalid step_in_backward=True with torch\.distributed \(world size 2\): "
                                           r"DDP .* use step_in_backward=False with DDP$"):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.state
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)  # one rank: as before
    model.zero_grad(set_to_none=True)
    train_step(model, opt, x, y)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("bucket_bytes", [None, 1, 64 * 1024], ids=["one-bucket", "per-parameter", "64KiB"])
def test_the_last_bucket_is_applied_when_backward_ends_before_step(bucket_bytes):
    """The updates are done, and the gradients freed, when backward returns: the last bucket is applied by
    autograd's end-of-backward callback, not left for step() (whose memory it would hold meanwhile)."""
    model = make_model("vit_tiny_patch16_224")
    other = twin(model)
    inside = fused_ft.SGD(model.parameters(), lr=0.05, momentum=0.9, step_in_backward=True, backend="reference")
    if bucket_bytes is not None:
        inside.bucket_bytes = bucket_bytes
    normal = fused_ft.SGD(other.parameters(), lr=0.05, momentum=0.9, backend="reference")
    first, (x, y) = batches(2)
    torch.nn.functional.cross_entropy(model(first[0]), first[1]).backward()
    assert all(p.grad is not None for p in model.parameters())  # the first iteration's wait for step()
    inside.step()
    train_step(other, normal, *first)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert freed_in_backward(inside)  # every bucket applied and freed by now
    other.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(other(x), y).backward()
    normal.step()
    for (n, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), n
    inside.step()
