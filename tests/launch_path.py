"""Every launch a CUDA step makes, through Triton's own launch path: ``python -m tests.launch_path --arch 90``.

Runs in a process of its own, started without ``TRITON_INTERPRET`` (the flag is read when
``@triton.jit`` decorates the kernels, and the suite's processes have it), with the launcher in its
CUDA configuration (``FUSED_FT_TRITON_TARGET=cuda``) and Triton's driver replaced by
``tests.stand_in_gpu`` (binder, specialization, compile for the arch, launcher argument packing; only
the launch itself is stubbed). The parameters are CPU tensors standing in for device memory: no
kernel runs, so only their addresses, dtypes and alignment matter, which is what a launch sees.

Families of launches (each a function below, named in the report):

- ``registry``: every optimizer x every variant of ``fused_ft.testing.specs`` x parameter dtype
  (fp32, fp16, bf16 with each ``bf16_update``), on an odd tensor list (0-dim, empty, below one
  block, non-power-of-two, several blocks, a transposed view, a 4-byte-offset view), beside a
  group without weight decay (timm's biases and norms: LARS and LAMB do not adapt there) and a
  frozen group; two steps (the first creates state).
- ``grad_dtypes``: the functional updates with gradients in another dtype than the parameters
  (bf16 and fp16 gradients of fp32 parameters, fp32 gradients of bf16 ones).
- ``mixed_dtypes``: one group holding fp32 and bf16 parameters (a launch per dtype; LAMB's global
  clip accumulates over both).
- ``step_in_backward``: the hooks' bucket launches, every optimizer, fp32 with the default bucket (the
  model's gradients in one) and bf16 with stochastic rounding with a bucket per parameter (single-tensor
  launches), beside a frozen layer.
- ``loop_scalars``: what the training loop hands the kernels on the device: GradScaler's grad_scale and
  found_inf (SGD, LARS, AdamW with fused=True; also found_inf alone, after ``unscale_``), and AdamW's
  capturable step counts, with a float lr and with a tensor lr, and LAMB's capturable group step; fp32, fp16
  and bf16.
- ``memory_profile``: the memory profiler's measured step (``fused_ft.memory.training_step``) for
  the rows gpu_check measures: sgd-freeze-embed and adamw, plain and step_in_backward, fp32 and bf16
  with stochastic rounding, on timm's test ViT.

Writes JSON: the recorded launches (family, kernel, arch, constexprs, signature), the launches
fused_ft counted (``triton_launch.launches()``) and every family's error, if any.
"""
from __future__ import annotations

import argparse
import json
import os
import traceback

os.environ.pop("TRITON_INTERPRET", None)
os.environ["FUSED_FT_TRITON_TARGET"] = "cuda"

import torch  # noqa: E402

from fused_ft.kernels import triton_launch as TL  # noqa: E402
from fused_ft.optim import adamw as adamw_mod  # noqa: E402
from fused_ft.optim import lamb as lamb_mod  # noqa: E402
from fused_ft.optim import lars as lars_mod  # noqa: E402
from fused_ft.optim import sgd as sgd_mod  # noqa: E402
from fused_ft.testing.specs import OPTIMIZERS  # noqa: E402
from tests.stand_in_gpu import DEVICES, stand_in_gpu  # noqa: E402

# The tensors stand in for device memory (see the module doc); the floor check still applies.
TL.unavailable_reason = lambda device: TL.below_floor_reason()

DTYPES = [(torch.float32, "nearest"), (torch.float16, "nearest"), (torch.bfloat16, "nearest"),
          (torch.bfloat16, "stochastic"), (torch.bfloat16, "kahan")]
SHAPES = [(), (0,), (5,), (1000,), (37, 41), (3, 1030)]


def _odd_list(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    params.append(torch.randn(40, 24, generator=g).to(dtype).t())  # strided
    params.append(torch.randn(1001, generator=g).to(dtype)[2:])  # offset by 4 bytes (fp32) or 2x2 (16-bit)
    params = [torch.nn.Parameter(p) for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return params


def _bf16_options(dtype, mode):
    return {"bf16_update": mode} if dtype == torch.bfloat16 else {}


def registry():
    for spec in OPTIMIZERS.values():
        for variant, kwargs in spec.variants.items():
            for dtype, mode in DTYPES:
                frozen = [torch.nn.Parameter(torch.randn(64).to(dtype), requires_grad=False)]
                no_decay = _odd_list(dtype, seed=4)[2:4]  # timm's group of biases and norms: LARS/LAMB unadapted
                groups = [{"params": _odd_list(dtype, seed=1)}, {"params": no_decay, "weight_decay": 0.0},
                          {"params": frozen, "frozen": True}]
                opt = spec.cls(groups, **kwargs, **_bf16_options(dtype, mode), backend="triton")
                for _ in range(2):
                    opt.step()


def grad_dtypes():
    shapes = [(33,), (7, 5), (), (0,), (2000,)]
    for param_dtype, grad_dtype in [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                    (torch.bfloat16, torch.float32)]:
        params = [torch.randn(s).to(param_dtype) for s in shapes]
        grads = [torch.randn(s).to(grad_dtype) for s in shapes]
        state = lambda: [torch.zeros(s) for s in shapes]  # noqa: E731
        sgd_mod.sgd(params, grads, [None] * len(params), lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01,
                    nesterov=True, maximize=False, update=TL.sgd)
        adamw_mod.adamw(params, grads, state(), state(), [], [torch.tensor(0.0) for _ in params], lr=0.01, beta1=0.9,
                        beta2=0.99, eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=True, update=TL.adamw)
        lars_mod.lars(params, grads, [None] * len(params), lr=0.5, momentum=0.9, dampening=0.0, weight_decay=1e-4,
                      nesterov=False, trust_coeff=1e-3, eps=1e-8, trust_clip=True, always_adapt=False, update=TL.lars)
        lamb_mod.lamb(params, grads, state(), state(), clip=TL.lamb_clip(grads, 1.0), lr=0.01, beta1=0.9, beta2=0.999,
                      beta3=0.1, bias_correction1=0.1, bias_correction2=0.001, eps=1e-6, weight_decay=0.01,
                      decoupled_decay=False, max_lr=None, trust_clip=False, always_adapt=False, update=TL.lamb)


def mixed_dtypes():
    for spec in OPTIMIZERS.values():
        params = _odd_list(torch.float32, seed=2)[2:5] + _odd_list(torch.bfloat16, seed=3)[2:5]
        opt = spec.cls(params, **next(iter(spec.variants.values())), backend="triton")
        for _ in range(2):
            opt.step()


def _small_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.LayerNorm(300), torch.nn.GELU(),
                                torch.nn.Linear(300, 4))
    return model.to(dtype)


def step_in_backward():
    for spec in OPTIMIZERS.values():
        for (dtype, mode), bucket_bytes in zip([(torch.float32, "nearest"), (torch.bfloat16, "stochastic")], (None, 1)):
            model = _small_model(dtype)
            model[0].requires_grad_(False)
            groups = [{"params": list(model[1:].parameters())},
                      {"params": list(model[0].parameters()), "frozen": True}]
            kwargs = dict(next(iter(spec.variants.values())))
            if spec.name == "lamb":
                kwargs["max_grad_norm"] = None  # global clipping needs every gradient: refused in backward
            opt = spec.cls(groups, **kwargs, **_bf16_options(dtype, mode), step_in_backward=True, backend="triton")
            if bucket_bytes is not None:
                opt.bucket_bytes = bucket_bytes  # a bucket per parameter: the hooks' single-tensor launches
            for _ in range(2):
                model(torch.randn(8, 16, dtype=dtype)).float().square().mean().backward()
                opt.step()


def memory_profile():
    import timm

    from fused_ft.memory import training_step

    for method in ("sgd-freeze-embed", "adamw"):
        for in_backward in (False, True):
            for dtype, mode in [(torch.float32, "nearest"), (torch.bfloat16, "stochastic")]:
                torch.manual_seed(0)
                model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32)
                _, step = training_step(model, method, 2, 32, dtype, step_in_backward=in_backward, bf16_update=mode,
                                        backend="triton")
                for _ in range(2):
                    step()


def loop_scalars():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for cls, kwargs in [(OPTIMIZERS["sgd"].cls, dict(lr=0.1, momentum=0.9)),
                            (OPTIMIZERS["lars"].cls, dict(lr=0.5, momentum=0.9, weight_decay=1e-4)),
                            (OPTIMIZERS["adamw"].cls, dict(lr=1e-3, fused=True)),
                            (OPTIMIZERS["adamw"].cls, dict(lr=1e-3, capturable=True)),
                            (OPTIMIZERS["adamw"].cls, dict(lr=torch.tensor(1e-3), capturable=True)),
                            (OPTIMIZERS["lamb"].cls, dict(lr=1e-3, capturable=True))]:
            opt = cls(_odd_list(dtype, seed=5), **kwargs, backend="triton")
            for grad_scale in (torch.full((1,), 1024.0), None, "none"):  # scaler.step, after unscale_, no scaler
                if grad_scale != "none":
                    opt.grad_scale, opt.found_inf = grad_scale, torch.zeros(1)
                opt.step()
                opt.__dict__.pop("grad_scale", None)
                opt.__dict__.pop("found_inf", None)


FAMILIES = {f.__name__: f for f in (registry, grad_dtypes, mixed_dtypes, step_in_backward, loop_scalars,
                                    memory_profile)}


def run(arch: int, families: list[str]) -> dict:
    device = next(d for d, (a, *_) in DEVICES.items() if a == arch)
    launches, counted, errors = [], {}, {}
    with stand_in_gpu(device) as driver:
        for name in families:
            before, first = sum(TL.launches().values()), len(driver.launches)
            try:
                FAMILIES[name]()
            except Exception:  # reported, and the other families still run
                errors[name] = traceback.format_exc(limit=-6)
            counted[name] = sum(TL.launches().values()) - before
            for launch in driver.launches[first:]:
                launches.append(dict(family=name, kernel=launch.kernel, arch=launch.arch, grid=launch.grid,
                                     num_warps=launch.num_warps, constants=launch.constants,
                                     signature=launch.signature, tensors=launch.tensors))
    return {"launches": launches, "counted": counted, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(a for a, *_ in DEVICES.values()), default=90)
    parser.add_argument("--families", nargs="*", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    args = parser.parse_args()
    report = run(args.arch, args.families)
    with open(args.out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
