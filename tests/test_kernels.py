"""The kernel backends (triton, in Triton's CPU interpreter, and cpu, the C++ extension) against
the reference backend.

Gradients are shared: each step the reference model's gradients are copied into the kernel
model, so the comparison measures the kernels, not the chaotic growth of 1e-7 differences
through separate forward passes.
"""
import pytest
import timm
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import fused_ft
from fused_ft.kernels import cpu as CPU
from fused_ft.kernels import triton_launch as TL
from fused_ft.optim import adamw as adamw_mod
from fused_ft.optim import lamb as lamb_mod
from fused_ft.optim import lars as lars_mod
from fused_ft.optim import sgd as sgd_mod
from fused_ft.testing.specs import OPTIMIZERS, UPDATES
from tests.helpers import assert_close_tensorwise
from tests.strategies import build, grads_like, tensor_lists

KERNEL_BACKENDS = ["triton", "cpu"]
MODULES = {"triton": TL, "cpu": CPU}
FP32 = 1e-6  # relative to each tensor's scale (see assert_close_tensorwise)


def _tol(dtype: torch.dtype) -> float:
    return FP32 if dtype == torch.float32 else torch.finfo(dtype).eps  # one unit in the last place


STEPS = 20
# Triton's interpreter runs a LAMB step of test_vit in about 3 s: on the timm models it runs 5 steps (the
# first tight, then the state feeding back), while the C++ kernels run all 20; the long triton
# trajectories are the odd tensor lists' 20 steps below and test_bf16_update's.
MODEL_STEPS = {"triton": 5, "cpu": STEPS}


def _pair(opt_name, kwargs, model_name, backend, seed=0):
    torch.manual_seed(seed)
    ref_model = timm.create_model(model_name, pretrained=False, num_classes=4)
    tri_model = timm.create_model(model_name, pretrained=False, num_classes=4)
    tri_model.load_state_dict(ref_model.state_dict())
    spec = OPTIMIZERS[opt_name]

    def groups(model):
        decay = [p for p in model.parameters() if p.ndim > 1]
        rest = [p for p in model.parameters() if p.ndim <= 1]
        return [{"params": decay}, {"params": rest, "lr": kwargs["lr"] * 0.5, "weight_decay": 0.0}]

    return (ref_model, spec.cls(groups(ref_model), **kwargs, backend="reference"),
            tri_model, spec.cls(groups(tri_model), **kwargs, backend=backend))


def _train_shared_grads(ref_model, ref, tri_model, tri, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(2, 3, 160, 160, generator=g), torch.randint(0, 4, (2,), generator=g)
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref_model(x), y).backward()
        for p, q in zip(ref_model.parameters(), tri_model.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        ref.step()
        tri.step()


def _assert_models_close(ref_model, tri_model, tol=FP32):
    for (name, p), q in zip(ref_model.named_parameters(), tri_model.parameters()):
        assert_close_tensorwise(q, p, rtol=tol, what=name)


def _assert_state_close(tri, ref, tol=FP32):
    pairs = zip((p for g in tri.param_groups for p in g["params"]), (p for g in ref.param_groups for p in g["params"]))
    for i, (a, b) in enumerate(pairs):
        assert tri.state.get(a, {}).keys() == ref.state.get(b, {}).keys(), f"param {i}"
        for key, value in ref.state.get(b, {}).items():
            assert_close_tensorwise(tri.state[a][key], value, rtol=tol, what=f"param {i} state[{key!r}]")


UPDATE_CASES = [
    pytest.param(u.optimizer, dict(u.kwargs), model, id=f"{u.name}-{model}")
    for u in UPDATES.values() for model in ("test_vit", "test_resnet")
]
VARIANT_CASES = [  # every option, minus variants that an update case above already runs on test_resnet
    pytest.param(spec.name, dict(kw), "test_resnet", id=f"{spec.name}-{variant}")
    for spec in OPTIMIZERS.values() for variant, kw in spec.variants.items()
    if not any(u.optimizer == spec.name and dict(u.kwargs) == dict(kw) for u in UPDATES.values())
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("opt_name,kwargs,model_name", UPDATE_CASES + VARIANT_CASES)
def test_kernels_match_reference_on_timm_models(opt_name, kwargs, model_name, backend):
    ref_model, ref, tri_model, tri = _pair(opt_name, kwargs, model_name, backend)
    _train_shared_grads(ref_model, ref, tri_model, tri, MODEL_STEPS[backend])
    # LARS/LAMB scale by a trust ratio from a reduction summed in another order: the registry's 1e-5
    tol = FP32 if opt_name in ("sgd", "adamw") else OPTIMIZERS[opt_name].reference_rtol
    _assert_models_close(ref_model, tri_model, tol)
    _assert_state_close(tri, ref, tol)


def _count_step(opt):
    before = dict(TL.launches())
    opt.step()
    return sum(TL.launches().values()) - sum(before.values())


@pytest.mark.triton
@pytest.mark.parametrize("update", list(UPDATES))
def test_launch_count_and_compiled_variants_are_bounded(update, monkeypatch):
    """test_vit2 has 120 parameter tensors; launches per step must not depend on that number."""
    monkeypatch.setattr(TL, "_execute", lambda kernel, grid, kwargs, num_warps: None)  # count, don't run
    u = UPDATES[update]
    model = timm.create_model("test_vit2", pretrained=False)
    params = list(model.parameters())
    assert len(params) >= 100
    embed = list(model.patch_embed.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("patch_embed.")]
    opt = OPTIMIZERS[u.optimizer].cls([{"params": rest}, {"params": embed, "frozen": True}],
                                      **u.kwargs, backend="triton")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    bound = {"lars": 3, "lamb": 4}.get(u.optimizer, 1)  # LAMB: global clip, moments, tensor norms, apply
    variants = []
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn_like(p)
        assert _count_step(opt) <= bound
        schedule.step()
        variants.append(TL.compiled_variants())
    assert len(set(variants)) == 1, f"recompiled during a cosine schedule: {variants}"


@pytest.mark.triton
def test_frozen_group_costs_no_launch_and_real_step_counts_match():
    model = timm.create_model("test_vit2", pretrained=False)
    params = list(model.parameters())
    frozen = fused_ft.AdamW([{"params": params, "frozen": True}], backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    assert _count_step(frozen) == 0
    live = fused_ft.SGD(params, lr=0.1, momentum=0.9, backend="triton")
    assert _count_step(live) == 1  # executed for real: 120 tensors, one launch
    assert all(live.state[p]["momentum_buffer"].dtype == torch.float32 for p in params)


LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("param_dtype", [torch.float32] + LOW_PRECISION)
# no shrinking: each example runs 20 interpreted steps, so shrinking a failure would take an hour
@settings(max_examples=4, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(specs=tensor_lists(max_tensors=6), seed=st.integers(0, 2**16))
# always: a zero gradient beside non-zero weights (the trust ratios' zero-norm guards), empty and 0-dim
@example(specs=[((40,), False, True), ((7, 5), True, False), ((0,), False, False), ((), False, True)], seed=3)
def test_kernels_match_reference_on_odd_tensor_lists(update, param_dtype, backend, specs, seed):
    """Triton's block size is 32 here, so the sizes 1-70 drawn span ragged multi-block tensors."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TL, "BLOCK_OVERRIDE", 32)
        _odd_lists_case(update, param_dtype, backend, specs, seed)


def _odd_lists_case(update, param_dtype, backend, specs, seed):
    u = UPDATES[update]
    params = {b: build(specs, seed, dtype=param_dtype) for b in ("reference", backend)}
    opts = {b: OPTIMIZERS[u.optimizer].cls(params[b], **u.kwargs, backend=b) for b in params}
    for step in range(STEPS):
        grads = [g.to(param_dtype) for g in grads_like(params["reference"], seed + step, specs)]
        for b in params:
            for p, g in zip(params[b], grads):
                p.grad = g.clone()
            opts[b].step()
    for i, (p, q) in enumerate(zip(params[backend], params["reference"])):
        assert p.dtype == param_dtype and p.stride() == q.stride()
        assert_close_tensorwise(p, q, rtol=_tol(param_dtype), what=f"param {i} {tuple(p.shape)}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_gradients_in_any_dtype_through_the_functional_api(param_dtype, grad_dtype, backend):
    torch.manual_seed(0)
    shapes = [(33,), (7, 5), (), (0,), (100,)]
    base = [torch.randn(s).to(param_dtype) for s in shapes]
    grads = [torch.randn(s).to(grad_dtype) for s in shapes]
    fp32_state = lambda: [torch.zeros(s) for s in shapes]  # noqa: E731
    calls = {
        "sgd": lambda ps, impl: sgd_mod.sgd(ps, grads, [None] * len(ps), lr=0.1, momentum=0.9, dampening=0.0,
                                            weight_decay=0.01, nesterov=True, maximize=False, update=impl),
        "adamw": lambda ps, impl: adamw_mod.adamw(ps, grads, fp32_state(), fp32_state(), [],
                                                  [torch.tensor(0.0) for _ in ps], lr=0.01, beta1=0.9, beta2=0.99,
                                                  eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=True,
                                                  update=impl),
        "lars": lambda ps, impl: lars_mod.lars(ps, grads, [None] * len(ps), lr=0.5, momentum=0.9, dampening=0.0,
                                               weight_decay=1e-4, nesterov=False, trust_coeff=1e-3, eps=1e-8,
                                               trust_clip=True, always_adapt=False, update=impl),
        "lamb": lambda ps, impl: lamb_mod.lamb(ps, grads, fp32_state(), fp32_state(), clip=None, lr=0.01,
                                               beta1=0.9, beta2=0.999, beta3=0.1, bias_correction1=0.1,
                                               bias_correction2=0.001, eps=1e-6, weight_decay=0.01,
                                               decoupled_decay=False, max_lr=None, trust_clip=False,
                                               always_adapt=False, update=impl),
    }
    for name, call in calls.items():
        ref, tri = [b.clone() for b in base], [b.clone() for b in base]
        call(ref, None)
        call(tri, getattr(MODULES[backend], name))
        for i, (p, q) in enumerate(zip(tri, ref)):
            assert_close_tensorwise(p, q, rtol=_tol(param_dtype), what=f"{name} param {i}")
        assert any(not torch.equal(p, b) for p, b in zip(tri, base) if p.numel())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaN and inf inputs
def test_bf16_store_rounds_as_torch_does_bit_for_bit(backend):
    # the parity tests allow one bf16 ulp, which a store rounding ties away from zero passes. SGD with
    # lr 1 from zero weights stores -grad: here every tie (low half 0x8000) below an even and an odd
    # bf16 value, its neighbours, subnormals, the largest finite values (which round to inf), inf and NaN
    high = torch.tensor([0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x0000, 0x0001, 0x8001, 0x7F7F, 0xFF7F, 0x7F80, 0x7FC0,
                         0x4B00, 0x4B01], dtype=torch.int64)
    low = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF], dtype=torch.int64)
    bits = ((high[:, None] << 16) | low[None, :]).flatten()
    target = bits.to(torch.int32).view(torch.float32)  # 91 values: 11 vectors of 8 and a scalar tail
    param = torch.zeros(target.shape, dtype=torch.bfloat16)
    sgd_mod.sgd([param], [-target], [None], lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False, update=getattr(MODULES[backend], "sgd"))
    expected = target.to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(param.isnan(), nan)
    assert torch.equal(param[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_hundreds_of_tiny_tensors_and_one_large_one(backend, monkeypatch):
    """200 tensors of 1-3 elements plus one of 70,001 elements (for triton: 18 blocks of 4,096,
    reduced 4 partials at a time, so the per-tensor norm loop runs several times)."""
    monkeypatch.setattr(TL, "BLOCK_OVERRIDE", 4096)
    monkeypatch.setattr(TL, "RBLOCK", 4)
    torch.manual_seed(0)
    shapes = [(1 + i % 3,) for i in range(200)] + [(70_001,)]
    for update in ("lamb", "lars", "adamw"):
        u = UPDATES[update]
        base = [torch.randn(s) for s in shapes]
        params = {b: [t.clone().requires_grad_() for t in base] for b in ("reference", backend)}
        opts = {b: OPTIMIZERS[u.optimizer].cls(params[b], **u.kwargs, backend=b) for b in params}
        for step in range(2):
            grads = [torch.randn(s) for s in shapes]
            for b in params:
                for p, g in zip(params[b], grads):
                    p.grad = g.clone()
                opts[b].step()
        for i, (p, q) in enumerate(zip(params[backend], params["reference"])):
            assert_close_tensorwise(p, q, rtol=FP32, what=f"{update} param {i}")


def test_triton_outside_the_interpreter_needs_cuda(monkeypatch):
    q = torch.randn(4, requires_grad=True)
    q.grad = torch.randn(4)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(fused_ft.BackendUnavailableError, match=r"needs CUDA tensors, but the parameters are on cpu"):
        fused_ft.SGD([q], lr=0.1, backend="triton").step()


def test_a_release_below_the_kernels_floor_is_refused_naming_the_fix_and_auto_falls_back(monkeypatch):
    """torch 2.5 ships Triton 3.1, whose interpreter gets the kernels wrong (COMPAT.md): refused by name,
    and auto on CUDA takes the reference backend with one warning instead of running unchecked kernels."""
    from fused_ft import doctor

    monkeypatch.setattr(TL.triton, "__version__", "3.1.0")
    monkeypatch.setattr(fused_ft.optim._dispatch, "_WARNED", set())
    q = torch.randn(4, requires_grad=True)
    q.grad = torch.randn(4)
    assert "triton" not in fused_ft.available_backends("cpu")  # TRITON_INTERPRET=1 would allow it otherwise
    refusal = r"needs Triton >= 3\.2, which comes with torch >= 2\.6; this environment has Triton 3\.1\.0"
    with pytest.raises(fused_ft.BackendUnavailableError, match=refusal):
        fused_ft.SGD([q], lr=0.1, backend="triton").step()
    with pytest.warns(UserWarning, match=refusal + r".*; falling back to backend='reference'"):
        name, _ = fused_ft.optim._dispatch.resolve("auto", "adamw", torch.device("cuda"), {})
    assert name == "reference"
    assert doctor._triton_line().startswith("3.1.0: backend='triton' needs Triton >= 3.2")
    # where the tensors cannot go is said first: a newer torch would not fix that
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(fused_ft.BackendUnavailableError, match=r"needs CUDA tensors, but the parameters are on cpu"):
        fused_ft.SGD([q], lr=0.1, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # FUSED_FT_TRITON_FLOOR=3.1 (read at import): to check an older Triton on a GPU before claiming it
    assert TL.floor_from({}) == TL.MIN_TRITON == TL.FLOOR
    monkeypatch.setattr(TL, "FLOOR", TL.floor_from({"FUSED_FT_TRITON_FLOOR": "3.1"}))
    assert "triton" in fused_ft.available_backends("cpu")
    monkeypatch.setattr(TL, "FLOOR", TL.MIN_TRITON)
    monkeypatch.setattr(TL.triton, "__version__", "3.2.0")
    assert "triton" in fused_ft.available_backends("cpu")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_refuse_float64_and_caution(backend):
    p = torch.randn(4, dtype=torch.float64, requires_grad=True)
    p.grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(fused_ft.BackendUnavailableError, match=rf"backend='{backend}' supports float32.*float64"):
        fused_ft.SGD([p], lr=0.1, backend=backend).step()
    q = torch.randn(4, requires_grad=True)
    q.grad = torch.randn(4)
    with pytest.raises(fused_ft.BackendUnavailableError, match=r"caution=True is implemented by backend='reference'"):
        fused_ft.LAMB([q], caution=True, backend=backend).step()
    # auto routes what a kernel backend cannot run to the reference backend instead
    opt = fused_ft.LAMB([q], caution=True)
    opt.step()
    assert q in opt.state


def test_cpu_backend_without_the_extension_says_how_to_fix_it(monkeypatch):
    monkeypatch.setattr(CPU, "_C", None)
    monkeypatch.setattr(fused_ft.optim._dispatch, "_WARNED", set())  # the warning is once per process
    monkeypatch.setattr(CPU, "_IMPORT_ERROR", "No module named 'fused_ft._C'")
    q = torch.randn(4, requires_grad=True)
    q.grad = torch.randn(4)
    with pytest.raises(fused_ft.BackendUnavailableError,
                       match=r"needs the C\+\+ extension.*pip install --no-build-isolation"):
        fused_ft.SGD([q], lr=0.1, backend="cpu").step()
    with pytest.warns(UserWarning, match=r"backend='cpu' .*falling back to backend='reference'"):
        fused_ft.SGD([q], lr=0.1).step()  # auto: one clear warning, then the reference backend


def test_auto_picks_the_cpu_kernels_for_cpu_tensors():
    assert fused_ft.available_backends("cpu")[0] == "cpu"
    q = torch.randn(4, requires_grad=True)
    q.grad = torch.randn(4)
    opt = fused_ft.SGD([q], lr=0.1)
    assert [plan.backend for plan in opt._plan_group(0, opt.param_groups[0])] == ["cpu"]


@pytest.mark.triton
@pytest.mark.parametrize("update", ["lars", "lamb"])
def test_norms_are_bit_identical_whatever_the_number_of_programs(update, monkeypatch):
    """LARS/LAMB norms and LAMB's global clip reduce in a fixed order: per block, per tensor (or per
    chunk), then in index order. Running the reductions on 1 or 3 grid-striding programs instead of
    one per block, tensor or chunk must not change a bit."""
    monkeypatch.setattr(TL, "BLOCK_OVERRIDE", 32)
    monkeypatch.setattr(TL, "CLIP_CHUNK", 2)
    grids = []
    real_execute = TL._execute
    monkeypatch.setattr(TL, "_execute", lambda k, grid, kw, w: (grids.append((k.fn.__name__, grid)),
                                                                 real_execute(k, grid, kw, w)))
    u = UPDATES[update]
    results, most_programs = [], []
    for limit in (None, 3, 1):
        monkeypatch.setattr(TL, "GRID_LIMIT", limit)
        grids.clear()
        torch.manual_seed(0)
        params = [torch.randn(s).requires_grad_() for s in [(300,), (7, 40), (65,), (1,)]]
        opt = OPTIMIZERS[u.optimizer].cls(params, **u.kwargs, backend="triton")
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append([p.detach().clone() for p in params])
        reductions = {"block_sumsq_kernel", "tensor_sums_kernel", "clip_kernel"}
        most_programs.append(max(grid for name, grid in grids if name in reductions))
    assert most_programs[0] > 3 and most_programs[1:] == [3, 1]
    for limited in results[1:]:
        for a, b in zip(limited, results[0]):
            assert torch.equal(a, b)


@pytest.mark.triton
def test_cuda_target_runs_the_cuda_configuration_in_the_interpreter(monkeypatch):
    """FUSED_FT_TRITON_TARGET=cuda: the launch configuration a GPU gets (BLOCK 1024; 8 warps where
    a 16-bit stream meets fp32 state), still correct in the interpreter."""
    monkeypatch.setenv("FUSED_FT_TRITON_TARGET", "cuda")
    configs = []
    real_execute = TL._execute
    monkeypatch.setattr(TL, "_execute", lambda k, grid, kw, w: (configs.append((kw["BLOCK"], w)),
                                                                 real_execute(k, grid, kw, w)))
    torch.manual_seed(0)
    for dtype, warps in ((torch.float32, 4), (torch.bfloat16, 8)):
        base = [torch.randn(s).to(dtype) for s in [(2500,), (3, 5)]]
        params = {b: [t.clone().requires_grad_() for t in base] for b in ("reference", "triton")}
        opts = {b: fused_ft.AdamW(params[b], lr=1e-2, backend=b) for b in params}
        for b in params:
            for p, t in zip(params[b], base):
                p.grad = torch.ones_like(t)
            opts[b].step()
        assert configs[-1] == (1024, warps)
        for p, q in zip(params["triton"], params["reference"]):
            assert_close_tensorwise(p, q, rtol=_tol(dtype))


@pytest.mark.triton
def test_misaligned_views_go_through_aligned_copies():
    """A parameter that starts 4 bytes into its storage would break the kernels' 16-byte alignment
    hint; the launcher updates an aligned copy and writes it back."""
    storage = torch.randn(1 + 70)
    views = {b: torch.nn.Parameter(storage.clone()[1:]) for b in ("reference", "triton")}
    assert views["triton"].data_ptr() % 16 != 0
    opts = {b: fused_ft.SGD([views[b]], lr=0.1, momentum=0.9, backend=b) for b in views}
    for _ in range(2):
        for b, p in views.items():
            p.grad = torch.linspace(-1, 1, 70)
            opts[b].step()
    assert_close_tensorwise(views["triton"], views["reference"], rtol=FP32)
    assert_close_tensorwise(opts["triton"].state[views["triton"]]["momentum_buffer"],
                            opts["reference"].state[views["reference"]]["momentum_buffer"], rtol=FP32)


# Learning rates at which 8 steps move the weights (about 0.02) by far more than bf16's rounding
# (1/256 of a weight): LARS and LAMB scale their steps to the weight norm, by trust_coeff=1e-3 and 1.
BF16_LR = {"sgd": 0.05, "sgd-nomom": 0.05, "adamw": 3e-3, "lars": 20.0, "lamb": 0.05}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("update", list(UPDATES))
def test_bf16_parameters_follow_the_fp32_trajectory(update, backend):
    """bf16 parameters on a kernel backend against fp32 parameters on the reference backend, from the
    same (bf16-representable) start with the same gradients: the gap stays under a tenth of how far
    the weights moved. Comparing bf16 with bf16 at one bf16 ulp, as the tests above do, lets a kernel
    that drops AdamW's bias correction pass; this does not."""
    u = UPDATES[update]
    kwargs = {**u.kwargs, "lr": BF16_LR[update]}
    torch.manual_seed(0)
    start = [(0.02 * torch.randn(s)).to(torch.bfloat16) for s in [(300,), (20, 17), (5,)]]
    fp32 = [p.float().requires_grad_() for p in start]
    bf16 = [p.clone().requires_grad_() for p in start]
    cls = OPTIMIZERS[u.optimizer].cls
    ref, ours = cls(fp32, **kwargs, backend="reference"), cls(bf16, **kwargs, backend=backend)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        for a, b in zip(fp32, bf16):
            grad = torch.randn(a.shape, generator=g).to(torch.bfloat16)
            a.grad, b.grad = grad.float(), grad
        ref.step()
        ours.step()
    for i, (a, b, s) in enumerate(zip(fp32, bf16, start)):
        moved = (a.detach() - s.float()).abs().max().item()
        gap = (b.detach().float() - a.detach()).abs().max().item()
        assert moved > 10 * torch.finfo(torch.bfloat16).eps * a.detach().abs().max().item(), (i, moved)
        assert gap <= 0.1 * moved, f"param {i}: bf16 is {gap:.3g} from fp32 after a move of {moved:.3g}"


@pytest.mark.triton
@pytest.mark.parametrize("update", ["sgd", "adamw", "lamb"])
def test_host_helpers_without_the_extension_give_the_same_steps(update, monkeypatch):
    """The step's C++ host helpers (planning, address tables, AdamW's step counts) have Python
    fallbacks for installs without a compiler, which CI never otherwise runs: the same triton steps,
    bit for bit, with and without them, on a list of five tensors with gradients (an odd count), a
    gradient-free parameter and a misaligned view; and every address row 16-byte aligned."""
    from fused_ft.kernels import _layout
    from fused_ft.optim import _base

    def run():
        torch.manual_seed(0)
        params = [torch.randn(s).requires_grad_() for s in [(300,), (7, 5), (9,), (3,), (2,)]]
        params.append(torch.nn.Parameter(torch.randn(41)[1:]))  # starts 4 bytes in: an aligned copy
        opt = OPTIMIZERS[UPDATES[update].optimizer].cls(params, **UPDATES[update].kwargs, backend="triton")
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params[:2] + params[3:]:  # params[2] never gets a gradient
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach().clone() for p in params], opt
    with_cpp, _ = run()
    for module in (_base, _layout, adamw_mod):
        monkeypatch.setattr(module, "_C", None)
    TL._ADDRESSES.clear()
    without, opt = run()
    for a, b in zip(without, with_cpp):
        assert torch.equal(a, b)
    # every address row starts 16-byte aligned (the table of an odd number of tensors is padded)
    assert all(row.data_ptr() % 16 == 0 for rows in TL._ADDRESSES.values() for row in rows)
    if update == "adamw":
        assert [opt.state[p]["step"].item() for p in opt.param_groups[0]["params"] if p in opt.state] == [3.0] * 5
