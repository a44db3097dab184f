"""Interleaved same-round comparison of every provider, written to benchmarks/RESULTS.md.

Run: ``python -m benchmarks.compare [--rounds 12]`` (``make bench`` runs it after the
pytest-benchmark suite). Each round times the add sweep, then every provider of every update, so
each ratio compares numbers measured back to back; the table reports medians over rounds.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from pathlib import Path

import torch

from benchmarks.providers import add_sweep, make_setup, providers_for, timed, vit_b16_shapes
from fused_ft.testing.specs import UPDATES

RESULTS = Path(__file__).with_name("RESULTS.md")
ADD_BYTES_PER_ELEMENT = 12
TARGETS = {  # the CPU speed bars: (min ratio to torch fused or speed-up over timm, min fraction of add-sweep bandwidth)
    "sgd": ("torch-fused", 0.95, 0.85), "sgd-nomom": ("torch-fused", 0.95, 0.85),
    "adamw": ("torch-fused", 0.95, 0.85), "lars": ("timm", 2.0, 0.70), "lamb": ("timm", 4.0, 0.70),
}


def run(rounds: int) -> list[dict]:
    shapes = vit_b16_shapes()
    numel = sum(s.numel() for s in shapes)
    sweep = add_sweep(shapes)
    sweep()
    rows = []
    for update, u in UPDATES.items():
        setups = {p: make_setup(p, update, shapes) for p in providers_for(update)}
        times = {p: [] for p in setups}
        faults = {p: [] for p in setups}
        add_times = []
        # The order rotates from round to round: whatever runs right after the add sweep pays for
        # its dirty cache lines (about 2% measured), so no provider may always follow it.
        order = ["add", *setups]
        for r in range(rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                if name == "add":
                    add_times.append(timed(sweep)[0])
                    continue
                seconds, minflt = timed(setups[name].step)
                times[name].append(seconds)
                faults[name].append(minflt)
        add_bw = [ADD_BYTES_PER_ELEMENT * numel / t for t in add_times]
        baseline, _, _ = TARGETS[update]
        for provider in setups:
            bw = [u.min_bytes_per_param * numel / t for t in times[provider]]
            rows.append(dict(
                update=update, provider=provider, ms=1000 * statistics.median(times[provider]),
                gbs=statistics.median(bw) / 1e9,
                vs_add=statistics.median(b / a for b, a in zip(bw, add_bw)),
                vs_baseline=statistics.median(tb / t for tb, t in zip(times[baseline], times[provider])),
                faults=statistics.median(faults[provider]),
            ))
        del setups
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| update | provider | ms/step | GB/s (min bytes) | x add-sweep bandwidth | speed vs baseline | "
             "page faults/step |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        baseline = TARGETS[r["update"]][0]
        lines.append(f"| {r['update']} | {r['provider']} | {r['ms']:.1f} | {r['gbs']:.2f} | {r['vs_add']:.2f} | "
                     f"{r['vs_baseline']:.2f} (vs {baseline}) | {r['faults']:.0f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> str:
    out = []
    for update, (baseline, speed, bandwidth) in TARGETS.items():
        r = next(r for r in rows if r["update"] == update and r["provider"] == "fused_ft-cpu")
        ok_speed, ok_bw, ok_faults = r["vs_baseline"] >= speed, r["vs_add"] >= bandwidth, r["faults"] == 0
        out.append(f"- {update}: {r['vs_baseline']:.2f}x {baseline} (target {speed}x) "
                   f"{'met' if ok_speed else 'MISSED'}; {r['vs_add']:.1%} of add-sweep bandwidth "
                   f"(target {bandwidth:.0%}) {'met' if ok_bw else 'MISSED'}; {r['faults']:.0f} page faults/step "
                   f"{'(met)' if ok_faults else '(MISSED: target 0)'}")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=12,
                        help="a multiple of 4 and 6 puts every provider right after the add sweep equally often")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    rows = run(args.rounds)
    section = (
        f"## CPU step, ViT-B/16 parameter list (86M fp32), {datetime.date.today()}\n\n"
        f"Command: `python -m benchmarks.compare --rounds {args.rounds}` (part of `make bench`). "
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Medians over {args.rounds} interleaved rounds; every ratio is "
        "taken within a round.\n\n" + table(rows) + "\n\nAgainst the CPU targets (fused_ft-cpu):\n\n"
        + verdicts(rows) + "\n"
    )
    print(section)
    if not args.no_write:
        _write_section(section)


def _write_section(section: str) -> None:
    """Replace this benchmark's section of RESULTS.md, keep the others (GPU runs, later issues)."""
    marker = "## CPU step, ViT-B/16 parameter list"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    head, sep, rest = text.partition(marker)
    tail = rest[rest.find("\n## ") + 1:] if sep and "\n## " in rest else ""
    RESULTS.write_text(head.rstrip() + "\n\n" + section + ("\n" + tail if tail else ""))


if __name__ == "__main__":
    main()
