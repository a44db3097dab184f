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


SECTIONS = {"parity": parity, "speed": speed, "memory": memory, "loop": loop}
GATING = {"parity", "memory"}  # speed targets are reported, not gating (one run is one sample)


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
