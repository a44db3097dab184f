"""What storing bf16 weights stochastically or with kahan compensation costs over rounding to nearest.

Run: ``python -m benchmarks.bf16_rounding [--rounds 12]`` (``make bench`` runs it). The C++ backend
(``fused_ft-cpu``) updates the ViT-B/16 parameter list in bf16 (weights and gradients) with each of
the five updates; each round times the three modes back to back, in an order that rotates from round
to round, and the table gives medians over rounds and each mode's time over nearest's. The target:
stochastic at most 15% over nearest.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.providers import make_setup, timed, vit_b16_shapes
from fused_ft._precision import BF16_UPDATES
from fused_ft.testing.specs import UPDATES

STOCHASTIC_OVERHEAD_TARGET = 1.15


def run(rounds: int) -> list[dict]:
    shapes = vit_b16_shapes()
    rows = []
    for update in UPDATES:
        setups = {mode: make_setup("fused_ft-cpu", update, shapes, dtype=torch.bfloat16, bf16_update=mode,
                                   bf16_seed=0) for mode in BF16_UPDATES}
        times: dict[str, list[float]] = {mode: [] for mode in setups}
        order = list(setups)
        for r in range(rounds):
            for mode in order[r % len(order):] + order[:r % len(order)]:
                times[mode].append(timed(setups[mode].step)[0])
        for mode in setups:
            rows.append(dict(update=update, mode=mode, ms=1000 * statistics.median(times[mode]),
                             vs_nearest=statistics.median(t / n for t, n in zip(times[mode], times["nearest"]))))
        del setups
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| update | bf16_update | ms/step | time / nearest |", "|---|---|---:|---:|"]
    lines += [f"| {r['update']} | {r['mode']} | {r['ms']:.1f} | {r['vs_nearest']:.2f} |" for r in rows]
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    worst = max((r for r in rows if r["mode"] == "stochastic"), key=lambda r: r["vs_nearest"])
    met = "met" if worst["vs_nearest"] <= STOCHASTIC_OVERHEAD_TARGET else "NOT met"
    return (f"stochastic rounding costs at most {worst['vs_nearest']:.2f}x nearest ({worst['update']}); "
            f"target <= {STOCHASTIC_OVERHEAD_TARGET}x: {met}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    rows = run(args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ViT-B/16 list, bf16 weights and grads\n")
    print(table(rows))
    print("\n" + verdict(rows))


if __name__ == "__main__":
    main()
