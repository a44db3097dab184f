"""The demo behind `make demo`: the paper's memory table (Table 4) for the three CLIP models, simulated.

Runs on any machine in about a minute: the models are built on the meta device and every tensor of
a training step is counted (fused_ft.memory). Then what fused_ft adds beyond the paper: the optimizer
step inside backward, which frees each gradient as soon as it is used.
"""
from __future__ import annotations

from fused_ft import memory_report

GIB = 2**30


def main() -> None:
    print("fused_ft demo 1/2: memory of one training step at micro-batch 1 (simulated; paper Table 4)\n")
    rows = memory_report.run_table(memory_report.DEFAULT_MODELS, memory_report.DEFAULT_METHODS)
    print(memory_report.render(rows, "table"))
    print("\n* gradients alive at the peak. 'AdamW +%' is how much more AdamW needs than the method; the paper measured the whole GPU process")
    print("(CUDA context, allocator caching, mixed-precision copies), which adds the same amount to every method.\n")
    print("fused_ft demo 2/2: beyond the paper, CLIP ViT-L/14 at micro-batch 1\n")
    runs = memory_report.beyond_the_paper()
    adamw = runs[0][1].peak
    for label, p in runs:
        print(f"  {label:<58} peak {p.peak / GIB:6.2f} GiB   AdamW / this = {adamw / p.peak:4.2f}x")
