"""step_in_backward's iteration time against the plain step's, on the CPU: ``python -m benchmarks.step_in_backward``.

The model is the one issue 31 measured on: 75 ``Linear(64, 64)`` layers (150 parameters, as many as
ViT-B/16's 152), batch 8, SGD with momentum on the ``cpu`` backend, one thread. Compute is small there,
so the host work of the optimizer shows: the extra microseconds of a step_in_backward iteration over a
plain one, divided by the 150 hooked parameters, is the host cost of a hooked parameter. Rounds are
interleaved (plain, then step_in_backward) and each figure is the median over rounds of the mean of
``--iterations`` iterations. The target (issue 31): step_in_backward at most 1.25x the plain iteration.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fused_ft

LAYERS, WIDTH, BATCH = 75, 64, 8


def _setup(step_in_backward: bool, bucket_bytes: int | None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    opt = fused_ft.SGD(model.parameters(), lr=1e-3, momentum=0.9, backend="cpu", step_in_backward=step_in_backward)
    if bucket_bytes is not None:
        opt.bucket_bytes = bucket_bytes
    x = torch.randn(BATCH, WIDTH)

    def iteration() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(5):  # state, caches
        iteration()
    return iteration


def _ms(iteration, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        iteration()
    return (time.perf_counter() - start) / n * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--iterations", type=int, default=40, help="iterations averaged per round (default: 40)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = {"plain": _setup(False, None), "step_in_backward (bucketed)": _setup(True, None),
             "step_in_backward (a bucket per parameter)": _setup(True, 1)}
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, iteration in cases.items():
            times[name].append(_ms(iteration, args.iterations))
    plain = statistics.median(times["plain"])
    params = 2 * LAYERS
    print(f"{LAYERS} x Linear({WIDTH}, {WIDTH}), batch {BATCH}, SGD momentum, backend='cpu', 1 thread; "
          f"median of {args.rounds} rounds x {args.iterations} iterations\n")
    print("| case | ms/iteration | x plain | extra host us per hooked parameter |\n|---|---:|---:|---:|")
    for name in cases:
        ms = statistics.median(times[name])
        extra = "" if name == "plain" else f"{(ms - plain) * 1e3 / params:.1f}"
        print(f"| {name} | {ms:.2f} | {ms / plain:.2f}x | {extra} |")


if __name__ == "__main__":
    main()
