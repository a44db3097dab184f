"""Every check that needs a GPU, in one run of under 5 minutes: ``python -m benchmarks.gpu_check``.

Sections (each runs on its own: one that fails is reported as such and the others still run):

1. ``parity``: the Triton kernels on CUDA against the reference backend, ViT-B/16's shapes (a 4M-element
   slice, every shape kind), by the suite's rule: one step tight (the spec's tolerance: 1e-6 relative,
   LARS/LAMB 1e-5), then 20 steps within twice the drift of torch's own ``fused=True`` from its for-loop
   over the same 20 steps (Adam-type updates amplify last-bit differences; LAMB is held to AdamW's
   drift, LARS to SGD's); bf16 with each ``bf16_update``: elements that differ from the reference after
   one step, and by how many ulps. Launches per step on the real GPU (SGD/AdamW 1, LARS 3, LAMB 4).
2. ``speed``: ms per step over 20 back-to-back steps between two CUDA events (the host runs ahead, so
   the GPU waits for it only where the host work of a step is longer than its device time: the host
   microseconds column, the Python side of the same 20 calls, shows where), and the kernels' device
   time from a CUDA-graph replay of the launches alone (a failed replay is said under the table);
   ViT-B/16 and ViT-L/16 parameter lists, fp32 and bf16, against torch ``fused=True`` and ``foreach``
   (SGD, AdamW) or timm (LARS, LAMB), and as a fraction of a 1 GiB device-to-device copy's bandwidth.
   Targets: SGD and AdamW at least 85% of the copy, and in fp32 at least torch fused's speed (with bf16
   parameters torch keeps bf16 state, fused_ft fp32 state: fewer bytes for torch, so its speed is shown,
   not a target); LARS and LAMB at least their design's byte floor (the bytes counted over the bytes
   moved: 20/28 and 28/44 in fp32). Bytes per parameter are each provider's own: state in fp32 for
   fused_ft, in the parameters' dtype for torch and timm.
3. ``memory``: simulated (with the device's cuBLAS workspaces, ``profile_memory(cuda_capability=...)``)
   against measured peaks, micro-batch 1: CLIP ViT-B/16 and ViT-L/14 with sgd-freeze-embed and adamw,
   and the README's headline rows (ViT-L/14, sgd-freeze-embed-nomom with step_in_backward, then with bf16
   weights and stochastic rounding). Bar: within 5%. CLIP comes from open_clip, or from timm where
   open_clip is not installed (the row says which).
4. ``loop``: a training iteration of timm ViT-B/16 (sgd-freeze-embed, bf16 autocast, batch 8 and 64):
   step_in_backward against the plain step (goal: within 3%), and ``torch.compile`` of the whole
   iteration, plain and step_in_backward, against the same eager iteration.
5. ``replay``: CUDA graphs. A captured step (SGD, LARS, AdamW with capturable=True, a float and a tensor lr, LAMB
   with capturable=True;
   ViT-B/16's slice, fp32 and bf16), replayed 10 times, against 10 eager steps on the same gradients; and a
   captured whole iteration (forward, backward, AdamW capturable step; gradients kept between iterations)
   replayed against the eager iteration. Bar: bit-equal weights and state, step counts included.
6. ``scaler``: GradScaler with fp16 autocast on a small model, one of 6 steps with an inf: host syncs counted
   with ``torch.cuda.set_sync_debug_mode`` over ``scaler.step`` (bar: 0 for SGD, LARS, AdamW fused=True or
   capturable=True and LAMB capturable=True, whose kernels unscale and skip; torch's for-loop AdamW shown for
   contrast), and the
   skipped step changing nothing (bar).

Prints the markdown to paste into benchmarks/RESULTS.md and writes it to ``--out`` (default
``$OUT/gpu_check.md`` when OUT is set). Exits 1 if a parity or memory check fails or a section errs, 2
without CUDA. ``--smoke`` runs the sections on the CPU on tiny inputs (the ``cpu`` backend in place of the
Triton kernels, timm's test ViT as the list): the suite's check that the script works, not a
measurement, and no verdict. It does not reach the CUDA-only code: the CUDA-event timing, the graph
replay, the measured memory and the device's name.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

COPY_BYTES = 1 << 30
# Fractions of the copy bandwidth each update must reach. SGD and AdamW move exactly the bytes counted;
# LARS and LAMB read more by design (a norm pass: LARS 28 B/param against 20 counted, LAMB 44 against 28).
TARGET_FRACTION = {"sgd": 0.85, "sgd-nomom": 0.85, "adamw": 0.85, "lars": 20 / 28, "lamb": 28 / 44}
DRIFT_FAMILY = {"sgd": "sgd", "sgd-nomom": "sgd", "lars": "sgd", "adamw": "adamw", "lamb": "adamw"}
LISTS = {"ViT-B/16": "vit_base_patch16_224", "ViT-L/16": "vit_large_patch16_224"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Env:
    """Where the check runs: a CUDA device, or the CPU for ``--smoke``."""

    device: str
    backend: str  # fused_ft's kernels here: triton on CUDA, cpu for the smoke run
    smoke: bool
    steps: int = 20  # back-to-back steps per timing, and the parity trajectories' length
    rounds: int = 5  # interleaved timing rounds (medians)
    notes: list = field(default_factory=list)  # what went wrong without failing a section (said under it)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed_ms(self, fn: Callable[[], None], repeat: int) -> tuple[float, float]:
        """(device ms per call, host us per call) of ``repeat`` back-to-back calls."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        host = time.perf_counter()
        for _ in range(repeat):
            fn()
        host = time.perf_counter() - host
        if self.cuda:
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / repeat, host / repeat * 1e6
        return host / repeat * 1e3, host / repeat * 1e6


# -- pure rules (tested on the CPU, tests/test_gpu_check.py) -------------------------------------------
def min_bytes(update: str, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> int:
    """The bytes per parameter an update must move: the registry's fp32 count with the gradient read and
    the parameter's read and write in ``dtype``, and the state's reads and writes in ``state_dtype``
    (fused_ft keeps fp32 state; torch and timm keep state in the parameters' dtype)."""
    from fused_ft.testing.specs import UPDATES

    fp32 = UPDATES[update].min_bytes_per_param
    size = torch.empty((), dtype=dtype).element_size()
    state = (fp32 - 3 * 4) // 4 * torch.empty((), dtype=state_dtype).element_size()
    return 3 * size + state


def multi_step_bound(one_step_tolerance: float, torch_drift: float) -> float:
    """The suite's rule for many steps: twice torch fused's own drift from its for-loop, never tighter
    than the one-step tolerance."""
    return max(one_step_tolerance, 2 * torch_drift)


def speed_verdict(update: str, fraction_of_copy: float, ms: float, torch_fused_ms: float | None) -> tuple[bool, str]:
    target = TARGET_FRACTION[update]
    met = fraction_of_copy >= target and (torch_fused_ms is None or ms <= torch_fused_ms)
    also = " and torch fused's speed" if torch_fused_ms is not None else ""
    return met, f">= {target:.0%} of copy{also}: {'met' if met else 'MISSED'}"


def rel_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest difference over the tensor's scale, over all tensors (each tensor against its own scale)."""
    worst = 0.0
    for a, e in zip(actual, expected):
        if e.numel():
            scale = e.detach().float().abs().max().clamp(min=1e-12)
            worst = max(worst, float((a.detach().float() - e.detach().float()).abs().max() / scale))
    return worst


def _numeric(text) -> bool:
    try:
        float(str(text).rstrip("x%").replace("+", "") or "x")
        return True
    except ValueError:
        return False


def markdown(headers: list[str], rows: list[list]) -> str:
    """A markdown table, numeric columns right-aligned."""
    rule = "|".join("---:" if rows and all(_numeric(r[i]) or r[i] in ("", "n/a") for r in rows) else "---"
                    for i in range(len(headers)))
    out = ["| " + " | ".join(headers) + " |", f"|{rule}|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# -- 1. parity --------------------------------------------------------------------------------------
def _slice_shapes(env: Env) -> list[torch.Size]:
    from benchmarks.providers import vit_b16_shapes

    if env.smoke:
        return [torch.Size(s) for s in [(), (0,), (7,), (33, 5), (2049,)]]
    shapes, total = [], 0
    for s in vit_b16_shapes():  # every shape kind, capped at about 4M elements
        if total + s.numel() <= 4_000_000 or s.numel() < 10_000:
            shapes.append(s)
            total += s.numel()
    return shapes


def _params(shapes, env: Env, seed=0, dtype=torch.float32):
    g = torch.Generator(device=env.device).manual_seed(seed)  # on the device: ViT-L/16 is 304M values
    return [torch.randn(s, generator=g, device=env.device).mul_(0.02).to(dtype).requires_grad_() for s in shapes]


def _torch_drift(family: str, shapes, env: Env) -> float:
    """torch fused=True against its for-loop after env.steps steps on the same gradients: the noise floor."""
    from fused_ft.testing.specs import UPDATES

    u = UPDATES["sgd" if family == "sgd" else "adamw"]
    cls = torch.optim.SGD if family == "sgd" else torch.optim.AdamW
    ps = {impl: _params(shapes, env) for impl in ("fused", "forloop")}
    opts = {"fused": cls(ps["fused"], **u.kwargs, fused=True), "forloop": cls(ps["forloop"], **u.kwargs, foreach=False)}
    _feed(ps, opts, shapes, env, env.steps)
    return rel_error(ps["fused"], ps["forloop"])


def _feed(ps, opts, shapes, env: Env, steps: int) -> list[int]:
    from fused_ft.kernels import triton_launch as TL

    g = torch.Generator(device=env.device).manual_seed(1)
    counts = []
    for _ in range(steps):
        grads = [torch.randn(s, generator=g, device=env.device).mul_(1e-3) for s in shapes]
        for name in ps:
            for p, gr in zip(ps[name], grads):
                p.grad = gr.to(env.device, p.dtype)
        before = sum(TL.launches().values())
        for opt in opts.values():
            opt.step()
        counts.append(sum(TL.launches().values()) - before)
    env.sync()
    return counts


def parity(env: Env) -> tuple[bool, str]:
    from fused_ft.testing.specs import OPTIMIZERS, UPDATES

    shapes = _slice_shapes(env)
    drift = {family: _torch_drift(family, shapes, env) for family in set(DRIFT_FAMILY.values())}
    ok, rows = True, []
    for name, u in UPDATES.items():
        spec = OPTIMIZERS[u.optimizer]
        tol = spec.reference_rtol
        ps = {b: _params(shapes, env) for b in ("reference", env.backend)}
        opts = {b: spec.cls(ps[b], **u.kwargs, backend=b) for b in ps}
        counts = _feed(ps, opts, shapes, env, 1)
        one = rel_error(ps[env.backend], ps["reference"])
        counts += _feed(ps, opts, shapes, env, env.steps - 1)
        many = rel_error(ps[env.backend], ps["reference"])
        bound = multi_step_bound(tol, drift[DRIFT_FAMILY[name]])
        met = one <= tol and many <= bound
        ok &= met
        rows.append([name, f"{one:.2e}", f"{tol:g}", f"{many:.2e}", f"{bound:.2e}",
                     f"{statistics.median(counts[1:]):g}", "ok" if met else "FAILED"])
    text = markdown(["update (fp32)", "1 step", "tolerance", f"{env.steps} steps", "bound (2x torch drift)",
                     "launches/step", "verdict"], rows)
    text += "\n\ntorch fused=True vs its for-loop after {} steps: SGD {:.2e}, AdamW {:.2e}.".format(
        env.steps, drift["sgd"], drift["adamw"])
    bf16_rows = []
    for name, u in UPDATES.items():
        spec = OPTIMIZERS[u.optimizer]
        for mode in ("nearest", "stochastic", "kahan"):
            ps = {b: _params(shapes, env, dtype=torch.bfloat16) for b in ("reference", env.backend)}
            opts = {b: spec.cls(ps[b], **u.kwargs, backend=b, bf16_update=mode, bf16_seed=0) for b in ps}
            _feed(ps, opts, shapes, env, 1)
            differ, ulps, total = 0, 0, 0
            for a, r in zip(ps[env.backend], ps["reference"]):
                ai, ri = a.detach().view(torch.int16).int(), r.detach().view(torch.int16).int()
                differ += int((ai != ri).sum())
                ulps = max(ulps, int((ai - ri).abs().max())) if a.numel() else ulps
                total += a.numel()
            bf16_rows.append([name, mode, f"{differ} of {total}", ulps])
    text += "\n\n" + markdown(["update (bf16)", "bf16_update", "elements != reference (1 step)", "max ulps"],
                              bf16_rows)
    return ok, text


# -- 2. speed ---------------------------------------------------------------------------------------
def _copy_bandwidth(env: Env, rounds: int) -> float:
    size = (1 << 24) if env.smoke else COPY_BYTES
    src = torch.empty(size, dtype=torch.uint8, device=env.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return statistics.median(2 * size / (env.timed_ms(lambda: dst.copy_(src), 5)[0] * 1e6) for _ in range(rounds))


def _kernel_replay_ms(opt, env: Env) -> float | None:
    """Device ms per step of the kernels alone: the step's launches captured once through the launcher
    (scalars fixed; each replay repeats the same update) and replayed. None where there is no CUDA."""
    if not env.cuda:
        return None
    try:
        return _replay_ms(opt, env)
    except Exception as exc:  # said under the table (and on stderr); the back-to-back timings stand
        message = f"graph replay of {type(opt).__name__} failed: {type(exc).__name__}: {exc}"
        env.notes.append(message)
        print(f"gpu_check: {message}", file=sys.stderr)
        return None


def _replay_ms(opt, env: Env) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        opt.step()  # warm: compiled, state and address tables exist
        torch.cuda.synchronize()
        from fused_ft.optim import _base

        capture_check = _base._refuse_graph_capture
        _base._refuse_graph_capture = lambda *args: None  # timing only: the replayed values are not used
        try:
            with torch.cuda.graph(graph, stream=stream):
                opt.step()
        finally:
            _base._refuse_graph_capture = capture_check
    torch.cuda.current_stream().wait_stream(stream)
    return env.timed_ms(graph.replay, env.steps)[0]


def speed(env: Env) -> tuple[bool, str]:
    from benchmarks.providers import make_setup, vit_shapes
    from fused_ft.testing.specs import UPDATES

    rounds = env.rounds
    copy_bw = _copy_bandwidth(env, rounds)
    ok, rows = True, []
    lists = {"test ViT": "test_vit"} if env.smoke else LISTS
    for list_name, model in lists.items():
        shapes = vit_shapes(model)
        numel = sum(s.numel() for s in shapes)
        for dtype_name, dtype in DTYPES.items():
            for name, u in UPDATES.items():
                ours = f"fused_ft-{env.backend}"
                others = ["torch-fused", "torch-foreach"] if u.optimizer in ("sgd", "adamw") else ["timm"]
                setups = {provider: make_setup(provider, name, shapes, dtype=dtype, device=env.device).optimizer
                          for provider in [ours, *others]}  # parameters, gradients, a warm-up step
                times = {p: [] for p in setups}
                hosts = {p: [] for p in setups}
                for _ in range(rounds):
                    for provider, opt in setups.items():
                        ms, host_us = env.timed_ms(opt.step, env.steps)
                        times[provider].append(ms)
                        hosts[provider].append(host_us)
                replay = _kernel_replay_ms(setups[ours], env)
                fused_ms = statistics.median(times["torch-fused"]) if "torch-fused" in times else None
                base = statistics.median(times[others[0]])
                for provider in setups:
                    ms = statistics.median(times[provider])
                    state_dtype = torch.float32 if provider == ours else dtype
                    gbs = min_bytes(name, dtype, state_dtype) * numel / (ms * 1e6)
                    verdict = ""
                    if provider == ours:  # torch's speed is a target in fp32 only (see the module doc)
                        met, verdict = speed_verdict(name, gbs / copy_bw, ms, fused_ms if dtype == torch.float32
                                                     else None)
                        ok &= met
                    rows.append([list_name, dtype_name, name, provider, f"{ms:.3f}",
                                 f"{statistics.median(hosts[provider]):.0f}",
                                 "" if provider != ours else "n/a" if replay is None else f"{replay:.3f}",
                                 f"{base / ms:.2f}x", f"{gbs:.0f}", f"{gbs / copy_bw:.2f}", verdict])
                del setups
                if env.cuda:
                    torch.cuda.empty_cache()
    text = markdown(["list", "dtype", "update", "provider", f"ms/step ({env.steps} back to back)", "host us/step",
                     "kernels ms (graph replay)", "vs torch-fused/timm", "GB/s (min bytes)", "x copy",
                     "target"], rows)
    text += f"\n\nDevice-to-device copy: {copy_bw:.0f} GB/s (read + write), median of {rounds} rounds."
    text += "".join(f"\n\nNote: {note}" for note in env.notes)
    return ok, text


# -- 3. memory --------------------------------------------------------------------------------------
def _clip(size: str) -> str:
    try:
        import open_clip  # noqa: F401

        return f"clip-vit-{size}"
    except ImportError:
        return f"timm-clip-vit-{size}"


MEMORY_ROWS = [  # (model size, method, options)
    ("b16", "sgd-freeze-embed", {}),
    ("b16", "adamw", {}),
    ("l14", "sgd-freeze-embed", {}),
    ("l14", "adamw", {}),
    ("l14", "sgd-freeze-embed-nomom", {"step_in_backward": True}),
    ("l14", "sgd-freeze-embed-nomom", {"step_in_backward": True, "param_dtype": "bf16", "bf16_update": "stochastic"}),
]


def memory(env: Env) -> tuple[bool, str]:
    from fused_ft.memory import profile_memory

    capability = torch.cuda.get_device_capability() if env.cuda else (9, 0)
    ok, rows = True, []
    for size, method, options in MEMORY_ROWS:
        model = "test_vit" if env.smoke else _clip(size)
        kwargs = dict(options, image_size=32) if env.smoke else options
        plain = profile_memory(model, method, **kwargs)
        sim = profile_memory(model, method, cuda_capability=capability, **kwargs)
        label = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        row = [model, method, label, f"{plain.peak / 2**30:.3f}", f"{sim.peak / 2**30:.3f}"]
        if env.cuda:
            real = profile_memory(model, method, device="cuda", **kwargs).peak
            torch.cuda.empty_cache()
            diff = real / sim.peak - 1
            ok &= abs(diff) <= 0.05
            row += [f"{real / 2**30:.3f}", f"{diff:+.1%}", "ok" if abs(diff) <= 0.05 else "FAILED"]
        else:
            row += ["n/a", "n/a", "n/a"]  # smoke: nothing to measure
        rows.append(row)
    text = markdown(["model", "method", "options", "simulated GiB (tensors)",
                     f"simulated GiB (+ cuBLAS workspaces, sm_{capability[0]}{capability[1]})", "measured GiB",
                     "measured vs simulated", "within 5%"], rows)
    return ok, text


# -- 4. the training loop ----------------------------------------------------------------------------
LOOP_CASES = ("plain", "step_in_backward", "compiled step", "compiled step, step_in_backward")
LOOP_TARGET = 1.03  # step_in_backward's iteration within 3% of the plain step's


def _loop_iteration(case: str, model_name: str, batch: int, env: Env):
    """One training iteration of ``case`` (timm ViT, sgd-freeze-embed, bf16 autocast), warmed up: the
    first iteration (step_in_backward's loop check, a plain step) and the compiles are behind it."""
    import fused_ft
    from fused_ft.vision.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(env.device)
    in_backward = case.endswith("step_in_backward")
    opt = fused_ft.create_optimizer(model, "sgd-freeze-embed", step_in_backward=in_backward, backend=env.backend)
    size = model.default_cfg["input_size"][-1]
    x = torch.randn(batch, 3, size, size, device=env.device)
    y = torch.randint(0, 10, (batch,), device=env.device)

    def iteration() -> None:
        with torch.autocast(env.device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fn = torch.compile(iteration) if case.startswith("compiled") else iteration
    for _ in range(3):
        fn()
    return fn


def loop(env: Env) -> tuple[bool, str]:
    """step_in_backward's iteration time against the plain step's (the goal: within 3%), and a compiled
    training iteration (forward, backward, step) against the eager one, interleaved rounds."""
    model_name, batches = ("test_vit", (2,)) if env.smoke else ("vit_base_patch16_224", (8, 64))
    ok, rows = True, []
    for batch in batches:
        fns = {case: _loop_iteration(case, model_name, batch, env) for case in LOOP_CASES}
        times = {case: [] for case in fns}
        for _ in range(env.rounds):
            for case, fn in fns.items():
                times[case].append(env.timed_ms(fn, env.steps)[0])
        ms = {case: statistics.median(t) for case, t in times.items()}
        for case in LOOP_CASES:
            base = ms["compiled step"] if case.startswith("compiled") and case != "compiled step" else ms["plain"]
            ratio = ms[case] / base
            verdict = ""
            if case.endswith("step_in_backward"):
                met = ratio <= LOOP_TARGET
                ok &= met
                verdict = "ok" if met else "NOT met"
            rows.append([model_name, batch, case, f"{ms[case]:.2f}", f"{ratio:.3f}x", verdict])
        del fns
        if env.cuda:
            torch.cuda.empty_cache()
    text = markdown(["model", "batch", "case (sgd-freeze-embed, bf16 autocast)", "ms/iteration",
                     "vs plain (compiled: vs compiled plain)", f"within {LOOP_TARGET - 1:.0%}"], rows)
    return ok, text


# -- 5. CUDA graphs ------------------------------------------------------------------------------------
REPLAYS = 10
REPLAY_CASES = {
    "sgd": ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
    "lars": ("lars", dict(lr=0.5, momentum=0.9, weight_decay=1e-4)),
    "adamw capturable": ("adamw", dict(lr=1e-3, weight_decay=0.05, capturable=True)),
    "adamw capturable, tensor lr": ("adamw", dict(lr="tensor", weight_decay=0.05, capturable=True)),
    "lamb capturable": ("lamb", dict(lr=1e-3, capturable=True)),
}


def _replay_pair(name: str, kwargs: dict, shapes, dtype, env: Env):
    """Two identical optimizers on identical parameters, each warmed up by one eager step on the same gradients."""
    from fused_ft.testing.specs import OPTIMIZERS

    made = []
    for _ in range(2):
        ps = _params(shapes, env, dtype=dtype)
        for p, g in zip(ps, _params(shapes, env, seed=1, dtype=dtype)):
            p.grad = g.detach().mul(1e-3)
        lr = torch.tensor(1e-3, device=env.device) if kwargs["lr"] == "tensor" else kwargs["lr"]
        opt = OPTIMIZERS[name].cls(ps, **{**kwargs, "lr": lr}, backend=env.backend)
        opt.step()
        made.append((ps, opt))
    return made


def _state_equal(a, b) -> bool:
    return all(torch.equal(x, y) for pa, pb in zip(a.state, b.state) for x, y in
               zip(a.state[pa].values(), b.state[pb].values()) if isinstance(x, torch.Tensor))


def _captured(step: Callable[[], None], env: Env) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (on a side stream, as torch's docs capture), or ``step`` itself on the CPU."""
    if not env.cuda:
        return step
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def _on_a_side_stream(step: Callable[[], None], times: int, env: Env) -> None:
    if not env.cuda:
        for _ in range(times):
            step()
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(times):
            step()
    torch.cuda.current_stream().wait_stream(stream)


def replay(env: Env) -> tuple[bool, str]:
    ok, rows = True, []
    shapes = _slice_shapes(env)
    for case, (name, kwargs) in REPLAY_CASES.items():
        for dtype_name, dtype in DTYPES.items():
            (ps_a, opt_a), (ps_b, opt_b) = _replay_pair(name, kwargs, shapes, dtype, env)
            replayed = _captured(opt_a.step, env)
            for _ in range(REPLAYS):
                replayed()
                opt_b.step()
            env.sync()
            equal = all(torch.equal(a, b) for a, b in zip(ps_a, ps_b)) and _state_equal(opt_a, opt_b)
            steps = [int(opt_a.state[p]["step"].item()) for p in ps_a[:1] if "step" in opt_a.state[p]]
            steps += [int(g["step"].item()) for g in opt_a.param_groups[:1] if "step" in g]  # LAMB's group step
            ok &= equal and (not steps or steps[0] == 1 + REPLAYS)
            rows.append([case, dtype_name, f"{rel_error(ps_a, ps_b):.1e}", steps[0] if steps else "n/a",
                         "ok" if equal else "FAILED"])
    # a whole iteration: forward, backward and a capturable AdamW step, the gradients kept between iterations
    finals = []
    for capture in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)).to(env.device)
        from fused_ft import AdamW

        opt = AdamW(model.parameters(), lr=torch.tensor(1e-3, device=env.device), capturable=True, backend=env.backend)
        x, y = torch.randn(32, 64, device=env.device), torch.randint(0, 10, (32,), device=env.device)

        def iteration():
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        _on_a_side_stream(iteration, 3, env)  # the warm-up, as torch's docs warm up before a capture: state exists
        fn = _captured(iteration, env) if capture else iteration
        for _ in range(REPLAYS):
            fn()
        env.sync()
        finals.append([p.detach().clone() for p in model.parameters()])
    equal = all(torch.equal(a, b) for a, b in zip(*finals))
    ok &= equal
    rows.append(["whole iteration (MLP, AdamW capturable)", "fp32", f"{rel_error(*finals):.1e}", 3 + REPLAYS,
                 "ok" if equal else "FAILED"])
    text = markdown(["captured step", "params", f"replayed x{REPLAYS} vs eager (max rel)", "step count",
                     "bit-equal"], rows)
    return ok, text + ("" if env.cuda else "\n(smoke: no capture on the CPU, the step itself is repeated)")


# -- 6. GradScaler without a host sync ---------------------------------------------------------------
SCALER_CASES = {
    "SGD momentum": ("sgd", dict(lr=0.05, momentum=0.9)),
    "LARS": ("lars", dict(lr=0.5, momentum=0.9, weight_decay=1e-4)),
    "AdamW fused=True": ("adamw", dict(lr=1e-3, fused=True)),
    "AdamW capturable=True": ("adamw", dict(lr=1e-3, capturable=True)),
    "LAMB capturable=True": ("lamb", dict(lr=1e-3, capturable=True)),
    "torch.optim.AdamW (for-loop, contrast)": (None, dict(lr=1e-3, foreach=False)),
}


def scaler(env: Env) -> tuple[bool, str]:
    import warnings

    from fused_ft.testing.specs import OPTIMIZERS

    ok, rows = True, []
    for case, (name, kwargs) in SCALER_CASES.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)).to(env.device)
        opt = (OPTIMIZERS[name].cls(model.parameters(), **kwargs, backend=env.backend) if name else
               torch.optim.AdamW(model.parameters(), **kwargs))
        grad_scaler = torch.amp.GradScaler(env.device)
        x, y = torch.randn(32, 64, device=env.device), torch.randint(0, 10, (32,), device=env.device)
        syncs, skipped_ok = 0, True
        for i in range(6):
            with torch.autocast(env.device, dtype=torch.float16 if env.cuda else torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            grad_scaler.scale(loss * (float("inf") if i == 3 else 1.0)).backward()
            before = [p.detach().clone() for p in model.parameters()]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if env.cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    grad_scaler.step(opt)
                finally:
                    if env.cuda:
                        torch.cuda.set_sync_debug_mode("default")
            syncs += sum("synchroniz" in str(w.message) for w in caught) if i > 0 else 0  # the first creates state
            if i == 3:
                skipped_ok = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            grad_scaler.update()
            opt.zero_grad()
        met = skipped_ok and (name is None or syncs == 0 or not env.cuda)
        ok &= met
        rows.append([case, syncs if env.cuda else "n/a", "yes" if skipped_ok else "NO", "ok" if met else "FAILED"])
    text = markdown(["optimizer", "host syncs in scaler.step (steps 2-6)", "inf step skipped, weights unchanged",
                     "bar"], rows)
    return ok, text


SECTIONS = {"parity": parity, "speed": speed, "memory": memory, "loop": loop, "replay": replay, "scaler": scaler}
GATING = {"parity", "memory", "replay", "scaler"}  # speed targets are reported, not gating (one run is one sample)


def run(env: Env, sections: list[str], command: str = "python -m benchmarks.gpu_check") -> tuple[int, str]:
    title = torch.cuda.get_device_name() if env.cuda else "CPU smoke run (not a measurement)"
    lines = [f"## GPU checks ({title}, torch {torch.__version__})\n", f"Command: `{command}`\n"]
    status = 0
    start = time.time()
    for name in sections:
        lines.append(f"### {name}\n")
        t0 = time.time()
        try:
            ok, text = SECTIONS[name](env)
            lines.append(text)
            verdict = ("ran (smoke run: no verdict)" if env.smoke else "passed" if ok else
                       "FAILED" if name in GATING else "targets NOT all met")
            lines.append(f"\n{name}: {verdict} ({time.time() - t0:.0f} s)\n")
            if not ok and name in GATING and not env.smoke:
                status = 1
        except Exception:  # one section's failure must not hide the others
            lines.append("```\n" + traceback.format_exc(limit=-8) + "```")
            lines.append(f"\n{name}: ERROR ({time.time() - t0:.0f} s)\n")
            status = 1
    lines.append(f"Total {time.time() - start:.0f} s.")
    return status, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.replace("``", "`"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="exit status: 0 all ran and parity/memory passed; 1 a parity or memory "
                                            "check failed or a section raised; 2 no CUDA device")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="SECTION",
                        help=f"which sections to run, in order (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--out", default=None, help="write the markdown here (default: $OUT/gpu_check.md if set)")
    parser.add_argument("--smoke", action="store_true", help="run the sections on the CPU on tiny inputs (no verdict)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.gpu_check", *(["--smoke"] if args.smoke else []),
                        *(["--sections", *args.sections] if args.sections != list(SECTIONS) else [])])
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (--smoke runs its code on the CPU)", file=sys.stderr)
        return 2
    env = Env("cpu", "cpu", True, steps=3, rounds=1) if args.smoke else Env("cuda", "triton", False)
    status, text = run(env, args.sections, command)
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.md") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
