"""Host work of one optimizer step with every kernel launch stubbed: ``python -m benchmarks.host_overhead``.

On a GPU the host prepares a step while the device runs the previous one, so the host work is a floor
on the step time that no kernel speed removes: a ViT-L/14 AdamW step moves 8.5 GB, about 2 ms at an
H200's bandwidth. This measures it on a CPU, as the number of tensors of the ViT-B/16 and ViT-L/14
parameter lists (152 and 297), for the five updates of ``fused_ft.testing.specs.UPDATES``:

- ``fused_ft-triton``: the real ``step()`` (planning, validation, state, dispatch, launch tables and
  launch bookkeeping) with the CUDA launch configuration, and only ``triton_launch._execute``
  stubbed. Run under ``TRITON_INTERPRET=1``, which only lets the dispatch accept CPU tensors.
- ``torch-fused``: ``torch.optim`` with ``fused=True`` on the same number of four-element CPU
  tensors (the yardstick the targets use); its CPU kernels run, on 4 elements each.
- ``torch-fused-stubbed``: the same with torch's fused kernels and its step-count ``_foreach_add_``
  stubbed, as fused_ft's launches are: torch's host work on a GPU, where both are launches. On a
  CPU its ``_foreach_add_`` over 0-dim step tensors alone costs about 2.5 us a tensor.

Three cases: the same gradient tensors every step; new gradient tensors every step (what
``zero_grad()`` plus backward gives when the allocator hands out other addresses), with fused_ft's
cached address tables dropped before each step, so that every step rebuilds them; and, for
fused_ft only, the same gradients with the address tables dropped ("rebuild"), which separates the
cost of the rebuild from that of reading gradients that are new to the CPU's caches.
Every figure is the median over interleaved rounds of the mean of ``--steps`` steps.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before fused_ft imports Triton: see the module doc
os.environ.setdefault("FUSED_FT_TRITON_TARGET", "cuda")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from benchmarks.providers import vit_shapes  # noqa: E402
from fused_ft.kernels import triton_launch as TL  # noqa: E402
from fused_ft.testing.specs import OPTIMIZERS, UPDATES  # noqa: E402

LISTS = {"ViT-B/16": "vit_base_patch16_224", "ViT-L/14": "vit_large_patch14_clip_224"}
TORCH_FUSED = ("sgd", "adamw")  # the optimizers torch.optim has fused=True for
TORCH_KERNELS = ("_fused_sgd_", "_fused_adamw_", "_foreach_add_")  # what torch-fused-stubbed stubs


def _stub(*args, **kwargs) -> None:
    pass


class _TorchStubbed:
    """torch's fused step with its kernels stubbed, for the duration of one step()."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def step(self) -> None:
        saved = {name: getattr(torch, name) for name in TORCH_KERNELS}
        try:
            for name in TORCH_KERNELS:
                setattr(torch, name, _stub)
            self.opt.step()
        finally:
            for name, fn in saved.items():
                setattr(torch, name, fn)


def _setup(provider: str, update: str, count: int) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    u = UPDATES[update]
    spec = OPTIMIZERS[u.optimizer]
    params = [torch.randn(4).requires_grad_() for _ in range(count)]
    for p in params:
        p.grad = torch.randn(4)
    if provider == "fused_ft-triton":
        opt = spec.cls(params, **u.kwargs, backend="triton")
    else:
        opt = spec.reference(params, **u.kwargs, fused=True)
    opt.step()  # state exists from here on: the steady state
    return params, _TorchStubbed(opt) if provider == "torch-fused-stubbed" else opt


def _timed_steps(params, opt, steps: int, case: str) -> float:
    """Mean seconds of host work per step in one of the cases of the module doc."""
    total = 0.0
    for _ in range(steps):
        if case == "new":
            for p in params:
                p.grad = torch.randn(4)
        if case in ("new", "rebuild"):
            TL._ADDRESSES.clear()
        start = time.perf_counter()
        opt.step()
        total += time.perf_counter() - start
    return total / steps


def measure(rounds: int = 7, steps: int = 20) -> list[dict]:
    """Rows of (list, update, provider, case, ms): providers interleaved within each round."""
    TL._execute = _stub
    rows = []
    for list_name, model in LISTS.items():
        count = len(vit_shapes(model))
        for update, u in UPDATES.items():
            providers = ["fused_ft-triton"]
            if u.optimizer in TORCH_FUSED:
                providers += ["torch-fused", "torch-fused-stubbed"]
            setups = {p: _setup(p, update, count) for p in providers}
            times: dict[tuple[str, str], list[float]] = {}
            for r in range(rounds):
                order = providers if r % 2 == 0 else providers[::-1]
                for case in ("same", "new", "rebuild"):
                    for p in order:
                        if case != "rebuild" or p == "fused_ft-triton":
                            times.setdefault((p, case), []).append(_timed_steps(*setups[p], steps, case))
            for (p, case), ts in times.items():
                rows.append(dict(list=list_name, tensors=count, update=update, provider=p, case=case,
                                 ms=1000 * statistics.median(ts)))
    return rows


def host_ms(rows: list[dict]) -> Callable[[str, str, str, str], float]:
    index = {(r["list"], r["update"], r["provider"], r["case"]): r["ms"] for r in rows}
    return lambda list_name, update, provider, case="same": index[(list_name, update, provider, case)]


def table(rows: list[dict]) -> str:
    ms = host_ms(rows)
    lines = ["| list | update | fused_ft same grads (ms) | fused_ft new grads (ms) | new / same | rebuild / same | "
             "torch fused same (ms) | torch fused new (ms) | torch new / same | fused_ft / torch (same) | "
             "torch fused, kernels stubbed (ms) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for list_name in LISTS:
        for update, u in UPDATES.items():
            same, new, rebuild = (ms(list_name, update, "fused_ft-triton", c) for c in ("same", "new", "rebuild"))
            if u.optimizer in TORCH_FUSED:
                t_same, t_new = (ms(list_name, update, "torch-fused", c) for c in ("same", "new"))
                stubbed = ms(list_name, update, "torch-fused-stubbed", "same")
                torch_cols = f"{t_same:.3f} | {t_new:.3f} | {t_new / t_same:.2f} | {same / t_same:.2f} | {stubbed:.3f}"
            else:
                torch_cols = "- | - | - | - | -"
            lines.append(f"| {list_name} | {update} | {same:.3f} | {new:.3f} | {new / same:.2f} | "
                         f"{rebuild / same:.2f} | {torch_cols} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> str:
    ms = host_ms(rows)
    out = []
    for list_name in LISTS:
        for update, u in UPDATES.items():
            same, new = (ms(list_name, update, "fused_ft-triton", c) for c in ("same", "new"))
            verdict = "met" if new <= 1.2 * same else "MISSED"
            line = f"- {list_name} {update}: new/same {new / same:.2f} (target <= 1.2) {verdict}"
            if u.optimizer in TORCH_FUSED:
                ratio = same / ms(list_name, update, "torch-fused", "same")
                verdict = "met" if ratio <= 1.0 else "MISSED"
                line += f"; same-tensor step {ratio:.2f}x torch fused (target <= 1.0) {verdict}"
            out.append(line)
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--steps", type=int, default=20, help="steps averaged per round (default: 20)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.rounds, args.steps)
    print(f"Command: `python -m benchmarks.host_overhead --rounds {args.rounds} --steps {args.steps}`, "
          f"torch {torch.__version__}, 1 thread\n")
    print(table(rows))
    print()
    print(verdicts(rows))


if __name__ == "__main__":
    main()
