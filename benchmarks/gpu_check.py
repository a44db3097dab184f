"""Every check that needs a GPU, in one run of under 5 minutes: ``python -m benchmarks.gpu_check``.

1. Triton parity on CUDA: 20 steps of every update on the ViT-B/16 parameter list (a 4M-element
   slice of it, all shapes kept), fp32 against the reference backend (rtol 1e-6; LARS/LAMB 1e-5).
2. Triton launches per step (<= 1 for SGD/AdamW, <= 3 for LARS/LAMB) on the real GPU.
3. Speed: ms/step of fused_ft-triton against torch fused=True (SGD, AdamW) and timm (LARS, LAMB) on
   the full ViT-B/16 list, same process, interleaved, with CUDA events; each update's minimal bytes
   per step as a fraction of the bandwidth of a device-to-device copy of a 1 GiB buffer timed in
   the same rounds (targets: 85% for SGD and AdamW, 65% for LARS and LAMB, and at least torch
   fused's speed).
4. Memory: simulated vs measured (torch.cuda.max_memory_allocated) peaks of CLIP ViT-B/16 and ViT-L/14,
   micro-batch 1, sgd-freeze-embed and adamw (the bar: within 5%).

Prints a markdown section to paste into benchmarks/RESULTS.md (and writes it to $OUT/gpu_check.md
when OUT is set). Exits non-zero if a parity or memory check fails.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch


def _params(shapes, seed=0, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(s, generator=g).mul_(0.02).to(device).requires_grad_() for s in shapes]


def parity(lines: list[str]) -> bool:
    from benchmarks.providers import vit_b16_shapes
    from fused_ft.testing.specs import OPTIMIZERS, UPDATES

    shapes, total = [], 0
    for s in vit_b16_shapes():  # every shape kind, capped at ~4M elements
        if total + s.numel() <= 4_000_000 or s.numel() < 10_000:
            shapes.append(s)
            total += s.numel()
    ok = True
    lines.append("| update | max rel. error (20 steps) | tolerance | launches/step |\n|---|---:|---:|---:|")
    from fused_ft.kernels import triton_launch as TL

    for name, u in UPDATES.items():
        spec = OPTIMIZERS[u.optimizer]
        tol = spec.reference_rtol
        ps = {b: _params(shapes) for b in ("reference", "triton")}
        opts = {b: spec.cls(ps[b], **u.kwargs, backend=b) for b in ps}
        g = torch.Generator(device="cpu").manual_seed(1)
        launches = []
        for _ in range(20):
            grads = [torch.randn(s, generator=g).mul_(1e-3).cuda() for s in shapes]
            for b in ps:
                for p, gr in zip(ps[b], grads):
                    p.grad = gr.clone()
            before = sum(TL.launches().values())
            for b in ps:
                opts[b].step()
            launches.append(sum(TL.launches().values()) - before)
        torch.cuda.synchronize()
        err = max(float(((a - r).abs().max() / r.abs().max().clamp(min=1e-12)))
                  for a, r in zip(ps["triton"], ps["reference"]))
        ok &= err <= tol
        lines.append(f"| {name} | {err:.2e} | {tol:g} | {statistics.median(launches):g} |")
    return ok


def _cuda_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


COPY_BYTES = 1 << 30
TARGET_FRACTION = {"sgd": 0.85, "sgd-nomom": 0.85, "adamw": 0.85, "lars": 0.65, "lamb": 0.65}


def speed(lines: list[str], rounds: int = 5) -> bool:
    from benchmarks.providers import build_optimizer, vit_b16_shapes
    from fused_ft.testing.specs import OPTIMIZERS, UPDATES

    shapes = vit_b16_shapes()
    numel = sum(s.numel() for s in shapes)
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731  (reads and writes 1 GiB each)
    copy()
    ok = True
    lines.append("\n| update | provider | ms/step | vs baseline | GB/s (min bytes) | x copy bandwidth | target |\n"
                 "|---|---|---:|---:|---:|---:|---|")
    for name, u in UPDATES.items():
        providers = ["fused_ft-triton"] + (["torch-fused"] if u.optimizer in ("sgd", "adamw") else ["timm"])
        setups = {}
        for p in providers:
            params = _params(shapes)
            for q in params:
                q.grad = torch.randn_like(q).mul_(1e-3)
            if p == "fused_ft-triton":
                opt = OPTIMIZERS[u.optimizer].cls(params, **u.kwargs, backend="triton")
            else:
                opt = build_optimizer(p, name, params)
            opt.step()
            setups[p] = opt
        times = {p: [] for p in providers}
        copy_gbs = []
        for _ in range(rounds):
            copy_gbs.append(2 * COPY_BYTES / _cuda_ms(copy) / 1e6)
            for p, opt in setups.items():
                times[p].append(_cuda_ms(opt.step))
        base = statistics.median(times[providers[1]])
        copy_bw = statistics.median(copy_gbs)
        for p in providers:
            ms = statistics.median(times[p])
            gbs = u.min_bytes_per_param * numel / ms / 1e6
            verdict = ""
            if p == "fused_ft-triton":
                vs_torch = providers[1] == "torch-fused"
                met = gbs / copy_bw >= TARGET_FRACTION[name] and (ms <= base or not vs_torch)
                ok &= met
                verdict = (f">= {TARGET_FRACTION[name]:.0%} of copy{' and torch fused speed' if vs_torch else ''}: "
                           f"{'met' if met else 'MISSED'}")
            lines.append(f"| {name} | {p} | {ms:.3f} | {base / ms:.2f}x | {gbs:.0f} | {gbs / copy_bw:.2f} | "
                         f"{verdict} |")
        del setups
        torch.cuda.empty_cache()
    lines.append(f"\nDevice-to-device copy of 1 GiB: {copy_bw:.0f} GB/s (read + write), median of {rounds} rounds.")
    return ok


def memory(lines: list[str]) -> bool:
    from fused_ft.memory import profile_memory

    ok = True
    lines.append("\n| model | method | simulated GiB | measured GiB | difference |\n|---|---|---:|---:|---:|")
    for model in ("clip-vit-b16", "clip-vit-l14"):
        for method in ("sgd-freeze-embed", "adamw"):
            sim = profile_memory(model, method)
            real = profile_memory(model, method, device="cuda")
            diff = real.peak / sim.peak - 1
            ok &= abs(diff) <= 0.05
            lines.append(f"| {model} | {method} | {sim.peak / 2**30:.3f} | {real.peak / 2**30:.3f} | {diff:+.1%} |")
            torch.cuda.empty_cache()
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device", file=sys.stderr)
        return 2
    start = time.time()
    lines = [f"## GPU checks ({torch.cuda.get_device_name()}, torch {torch.__version__})\n",
             "Command: `python -m benchmarks.gpu_check`\n"]
    ok = parity(lines)
    speed_ok = speed(lines)
    ok &= memory(lines)
    lines.append(f"\nTotal {time.time() - start:.0f} s; all parity and memory checks {'passed' if ok else 'FAILED'}; "
                 f"speed targets {'all met' if speed_ok else 'NOT all met'}.")
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.md"), "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
