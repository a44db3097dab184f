"""bf16 weights that still learn: stochastic rounding and kahan compensation in every backend.

Oracles: closed-form values (the exact fp32 value each store must round, the fp32 trajectory of a
constant update) and the reference backend (fused_ft._precision), whose integer arithmetic the
kernels repeat bit for bit.
"""
import math

import pytest
import torch

import fused_ft
from fused_ft._precision import COMPENSATION_KEY, merge_master, split_master
from fused_ft.kernels import triton_launch
from fused_ft.testing.specs import OPTIMIZERS, UPDATES

BACKENDS = ["reference", "cpu", "triton"]
ULP_AT_1 = 2.0**-7  # bf16's spacing in [1, 2)


def _sgd_store(backend, values_fp32_offset, mode, seed=3, n=None):
    """One SGD step that stores 1 + offset (exact in fp32) into bf16 weights of 1.0: w - lr * g with g = -1."""
    p = torch.ones(n or 1, dtype=torch.bfloat16, requires_grad=True)
    p.grad = -torch.ones_like(p)
    opt = fused_ft.SGD([p], lr=values_fp32_offset, backend=backend, bf16_update=mode, bf16_seed=seed)
    opt.step()
    return p.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fraction", [0.3, 0.75])
def test_stochastic_rounding_is_unbiased(backend, fraction):
    # 10^6 draws of 1 + fraction ulp, strictly between the neighbours 1 and 1 + ulp
    n = 10**6
    rounded = _sgd_store(backend, fraction * ULP_AT_1, "stochastic", n=n).double()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + ULP_AT_1}
    standard_error = ULP_AT_1 * math.sqrt(fraction * (1 - fraction) / n)
    assert abs(rounded.mean().item() - (1 + fraction * ULP_AT_1)) < 4 * standard_error
    # and to nearest, every one of them lands on the same neighbour
    nearest = _sgd_store(backend, fraction * ULP_AT_1, "nearest", n=n).double()
    assert nearest.unique().tolist() == [1.0 + ULP_AT_1 if fraction > 0.5 else 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_bits_are_fixed_by_the_seed_and_equal_the_reference(backend):
    n = 4096
    first = _sgd_store(backend, 0.5 * ULP_AT_1, "stochastic", seed=11, n=n)
    assert torch.equal(first, _sgd_store(backend, 0.5 * ULP_AT_1, "stochastic", seed=11, n=n))
    assert not torch.equal(first, _sgd_store(backend, 0.5 * ULP_AT_1, "stochastic", seed=12, n=n))
    # one tensor, one launch: the kernels hash the same integers as the reference
    assert torch.equal(first, _sgd_store("reference", 0.5 * ULP_AT_1, "stochastic", seed=11, n=n))


def _kahan_run(backend, steps, weights):
    p = weights.clone().requires_grad_()
    p.grad = torch.ones_like(p)
    opt = fused_ft.SGD([p], lr=1e-6, backend=backend, bf16_update="kahan")
    history = []
    for _ in range(steps):
        opt.step()
        history.append((p.detach().clone(), opt.state[p][COMPENSATION_KEY].clone()))
    return history


WEIGHTS = (1.0 + torch.arange(-32, 32) * 2.0**-7).bfloat16()  # near 1.0, on bf16's grid


@pytest.fixture(scope="module")
def reference_kahan_run():
    return _kahan_run("reference", 10_000, WEIGHTS)


def test_kahan_tracks_fp32_where_nearest_does_not_move(reference_kahan_run):
    # the fp32 result of 10,000 constant updates of 1e-6, computed step by step in fp32
    expected = WEIGHTS.float()
    for _ in range(10_000):
        expected = expected - torch.tensor(1e-6)
    weight, comp = reference_kahan_run[-1]
    assert torch.equal(merge_master(weight, comp), expected)  # weight + compensation: the fp32 result, exactly
    ulp = torch.where(expected < 1, 2.0**-8, 2.0**-7)
    assert ((weight.float() - expected).abs() <= ulp / 2).all()
    assert (weight != WEIGHTS).any()  # it moved: 0.01 is more than an ulp below 1.0
    nearest = WEIGHTS.clone().requires_grad_()
    nearest.grad = torch.ones_like(nearest)
    opt = fused_ft.SGD([nearest], lr=1e-6, backend="reference")
    for _ in range(100):
        opt.step()
    assert torch.equal(nearest.detach(), WEIGHTS)  # 1e-6 is far below half an ulp: every update is lost


def test_kahan_cpu_run_is_bit_identical_to_the_reference(reference_kahan_run):
    if "cpu" not in fused_ft.available_backends("cpu"):
        pytest.fail("the C++ extension is not built")
    cpu = _kahan_run("cpu", 10_000, WEIGHTS)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(reference_kahan_run, cpu))


def test_kahan_triton_step_is_bit_identical_on_every_state_of_the_run(reference_kahan_run):
    """10,000 interpreted launches would take minutes: instead, one launch takes every (weight,
    compensation) state the reference run visits, as elements of one tensor, and must produce each
    state's successor. Equal transitions from equal starts make equal runs."""
    starts = [(WEIGHTS, torch.zeros_like(WEIGHTS, dtype=torch.int16))] + reference_kahan_run[:-1]
    p = torch.cat([w for w, _ in starts]).requires_grad_()
    p.grad = torch.ones_like(p)
    opt = fused_ft.SGD([p], lr=1e-6, backend="triton", bf16_update="kahan")
    opt.state[p][COMPENSATION_KEY] = torch.cat([c for _, c in starts])
    opt.step()
    assert torch.equal(p.detach(), torch.cat([w for w, _ in reference_kahan_run]))
    assert torch.equal(opt.state[p][COMPENSATION_KEY], torch.cat([c for _, c in reference_kahan_run]))


def test_split_and_merge_are_exact_inverses_with_the_weight_rounded_to_nearest():
    x = torch.cat([torch.randn(10_000) * 10.0**k for k in range(-30, 30, 6)]
                  + [torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3e38, -1e-40])])
    weight, comp = split_master(x)
    assert torch.equal(merge_master(weight, comp), x)
    # the weight is the nearest bf16: torch's round-to-nearest-even, except at exact ties (away from zero)
    ties = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert torch.equal(weight[~ties], x.bfloat16()[~ties])
    tie = torch.tensor([1.0 + 2.0**-8, -(1.0 + 2.0**-8)])  # halfway between 1 and 1 + 2^-7
    assert split_master(tie)[0].tolist() == [1.0 + 2.0**-7, -(1.0 + 2.0**-7)]


@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_every_update_matches_the_reference_one_step(update, backend, mode):
    """One step of each of the five updates on a mixed list (bf16 and an fp32 tensor, which ignores the
    mode; the kernels split it into two launches): weights within one bf16 ulp of the reference (kernels'
    fp32 math rounds differently, and that may move a stochastic or kahan store by one ulp), fp32 tensors
    as close as without a mode."""
    spec = UPDATES[update]
    results = {}
    for b in ("reference", backend):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to(d).requires_grad_()
                  for s, d in [((40, 9), torch.bfloat16), ((300,), torch.bfloat16), ((7,), torch.float32)]]
        opt = OPTIMIZERS[spec.optimizer].cls(params, **spec.kwargs, backend=b, bf16_update=mode, bf16_seed=5)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
        results[b] = params, opt
    (ref, ref_opt), (out, opt) = results["reference"], results[backend]
    for r, o in zip(ref[:2], out[:2]):
        spacing = torch.nextafter(r.detach().float().abs(), torch.tensor(math.inf)) - r.detach().float().abs()
        assert ((r.detach().float() - o.detach().float()).abs() <= spacing * 1.01).all()
    torch.testing.assert_close(out[2].detach(), ref[2].detach(), rtol=1e-5, atol=1e-6)
    if mode == "kahan":
        assert COMPENSATION_KEY not in opt.state[out[2]]  # fp32 tensors keep no compensation
        for r, o in zip(ref[:2], out[:2]):
            ref_exact = merge_master(r.detach(), ref_opt.state[r][COMPENSATION_KEY])
            exact = merge_master(o.detach(), opt.state[o][COMPENSATION_KEY])
            torch.testing.assert_close(exact, ref_exact, rtol=1e-5, atol=1e-6)


def _bf16_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).bfloat16()


def _train(model, opt, steps=3, step_call=True):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).bfloat16()
        model(x).float().pow(2).mean().backward()
        if step_call:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_with_step_in_backward_equals_the_plain_step(backend):
    """The compensation is per element, so updating each parameter in its hook gives the same bits."""
    plain, hooked = _bf16_net(), _bf16_net()
    opt = fused_ft.SGD(plain.parameters(), lr=0.05, momentum=0.9, backend=backend, bf16_update="kahan")
    _train(plain, opt)
    opt_hooked = fused_ft.SGD(hooked.parameters(), lr=0.05, momentum=0.9, backend=backend, bf16_update="kahan",
                              step_in_backward=True)
    _train(hooked, opt_hooked)
    for a, b in zip(plain.parameters(), hooked.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a][COMPENSATION_KEY], opt_hooked.state[b][COMPENSATION_KEY])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bucket_bytes", [None, 1], ids=["one-bucket", "a-bucket-per-parameter"])
def test_stochastic_with_step_in_backward_is_reproducible_and_frozen_groups_stay_empty(backend, bucket_bytes):
    runs = []
    for _ in range(2):
        model = _bf16_net()
        first, *rest = list(model.parameters())
        opt = fused_ft.SGD([{"params": [first], "frozen": True}, {"params": rest}], lr=0.05, backend=backend,
                           bf16_update="stochastic", bf16_seed=9, step_in_backward=True)
        if bucket_bytes is not None:
            opt.bucket_bytes = bucket_bytes
        updates = 3 * (1 if bucket_bytes is None else len(rest))  # 3 steps; the small net's gradients fit one bucket
        before = triton_launch.launches().copy()
        first.requires_grad_(False)
        _train(model, opt)
        runs.append([p.detach().clone() for p in model.parameters()])
        assert not opt.state  # SGD without momentum: no state, whatever the rounding
        assert opt.param_groups[1]["bf16_step"] == updates  # one stream position per applied bucket
        assert "bf16_step" not in opt.param_groups[0]
        if backend == "triton":
            assert sum((triton_launch.launches() - before).values()) == updates
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_state_dict_keeps_seed_stream_and_compensation_and_torch_loads_it():
    model = _bf16_net()
    opt = fused_ft.SGD(model.parameters(), lr=0.05, momentum=0.9, backend="reference", bf16_update="kahan")
    _train(model, opt)
    saved = opt.state_dict()
    comps = [saved["state"][k][COMPENSATION_KEY] for k in saved["state"]]
    assert all(c.dtype == torch.int16 for c in comps) and any(c.any() for c in comps)
    again = fused_ft.SGD(model.parameters(), lr=0.05, momentum=0.9, backend="reference")
    again.load_state_dict(saved)  # torch would cast the int16 buffers to bf16 numbers
    assert again.param_groups[0]["bf16_update"] == "kahan"
    for p, comp in zip(model.parameters(), comps):
        assert again.state[p][COMPENSATION_KEY].dtype == torch.int16
        assert torch.equal(again.state[p][COMPENSATION_KEY], comp)
        assert again.state[p]["momentum_buffer"].dtype == torch.float32
    stochastic = fused_ft.SGD(model.parameters(), lr=0.05, bf16_update="stochastic", bf16_seed=4)
    _train(model, stochastic, steps=2)
    group = stochastic.state_dict()["param_groups"][0]
    assert (group["bf16_seed"], group["bf16_step"]) == (4, 2)
    # torch.optim skips fused_ft's own keys and trains on
    reference = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reference.load_state_dict(saved)
    _train(model, reference, steps=1)


def test_stochastic_resumed_from_a_state_dict_continues_the_same_stream():
    whole, resumed = _bf16_net(), _bf16_net()
    opt = fused_ft.SGD(whole.parameters(), lr=0.05, bf16_update="stochastic", bf16_seed=1)
    _train(whole, opt, steps=4)
    first = fused_ft.SGD(resumed.parameters(), lr=0.05, bf16_update="stochastic", bf16_seed=1)
    _train(resumed, first, steps=2)
    second = fused_ft.SGD(resumed.parameters(), lr=0.05, bf16_update="stochastic")
    second.load_state_dict(first.state_dict())
    gen_state = torch.Generator().manual_seed(1)
    for _ in range(2):  # the first two batches again, as _train draws them
        torch.randn(8, 6, generator=gen_state)
    for _ in range(2):
        resumed(torch.randn(8, 6, generator=gen_state).bfloat16()).float().pow(2).mean().backward()
        second.step()
        second.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_fp32_parameters_ignore_the_mode(mode):
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opts = [fused_ft.AdamW(a.parameters()), fused_ft.AdamW(b.parameters(), bf16_update=mode)]
    for model, opt in zip((a, b), opts):
        model(torch.ones(2, 5)).sum().backward()
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert all(COMPENSATION_KEY not in s for s in opts[1].state.values())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_rounding_arguments_are_refused_naming_them(name):
    cls = OPTIMIZERS[name].cls
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"Invalid bf16_update: 'round' \(choose from 'nearest', 'stochastic'"):
        cls(params, bf16_update="round")
    with pytest.raises(ValueError, match=r"Invalid bf16_seed: -1 \(must be >= 0\)"):
        cls(params, bf16_seed=-1)
    with pytest.raises(TypeError, match=r"Invalid bf16_seed: True \(must be an int\)"):
        cls(params, bf16_seed=True)
    half = [torch.zeros(3, dtype=torch.float16, requires_grad=True)]
    with pytest.raises(ValueError, match=r"Invalid bf16_update='kahan' for float16 parameters \(group 0\)"):
        cls(half, bf16_update="kahan")
    opt = cls(half)
    opt.param_groups[0]["bf16_update"] = "stochastic"  # changed in place: caught by the next step
    half[0].grad = torch.ones_like(half[0])
    with pytest.raises(ValueError, match=r"Invalid bf16_update='stochastic' for float16 parameters"):
        opt.step()
    assert torch.equal(half[0], torch.zeros(3, dtype=torch.float16))


def _layouts():
    """bf16 parameters of 1.0 in several memory layouts (each a view of a buffer laid out that way)."""
    yield "transposed", torch.ones(48, 64, dtype=torch.bfloat16).t()
    yield "channels_last", torch.ones(2, 6, 5, 7, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    yield "offset view", torch.ones(3001, dtype=torch.bfloat16)[1:]
    yield "contiguous", torch.ones(30, 70, dtype=torch.bfloat16)


def _grad_layouts(p):
    """-1 gradients (so w - lr * g is exact in fp32) in the parameter's layout, contiguous, and transposed."""
    yield "like the parameter", -torch.ones_like(p)
    yield "contiguous", -torch.ones(p.shape, dtype=p.dtype)
    if p.dim() >= 2:
        yield "transposed", -torch.ones(tuple(reversed(p.shape)), dtype=p.dtype).permute(*reversed(range(p.dim())))


@pytest.mark.parametrize("layout", [name for name, _ in _layouts()])
def test_stochastic_bits_follow_the_parameters_memory_order_whatever_the_gradients_layout(layout):
    """The random bits depend on the values, the seed, the step and the parameter's memory order alone: every
    backend, every gradient layout, the same bits (a transposed parameter with a contiguous gradient went
    through a contiguous copy in the kernels, which numbered its elements in another order)."""
    template = dict(_layouts())[layout]
    results = {}
    for backend in BACKENDS:
        for grad_name, grad in _grad_layouts(template):
            p = torch.empty_like(template) if layout != "offset view" else torch.empty(3001, dtype=torch.bfloat16)[1:]
            p.fill_(1.0).requires_grad_()
            assert p.stride() == template.stride()
            p.grad = grad.clone()  # keeps its layout
            fused_ft.SGD([p], lr=0.5 * ULP_AT_1, backend=backend, bf16_update="stochastic", bf16_seed=7).step()
            results[backend, grad_name] = p.detach().as_strided((p.numel(),), (1,)).clone()  # memory order
    expected = results["reference", "like the parameter"]
    assert len(set(expected.tolist())) == 2  # both neighbours drawn: the bits matter
    for key, bits in results.items():
        assert torch.equal(bits, expected), key
