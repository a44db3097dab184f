"""The demo behind `make demo`: the paper's memory table (Table 4) for the three CLIP models, simulated,
then a short shift-lab version of its accuracy experiment.

Runs on any machine in about a minute: the models are built on the meta device and every tensor of
a training step is counted (fused_ft.memory). Then what fused_ft adds beyond the paper: the optimizer
step inside backward, which frees each gradient as soon as it is used.
"""
from __future__ import annotations

from fused_ft import memory_report

GIB = 2**30
SHORT_METHODS = ("sgd", "sgd-freeze-embed", "sgd-freeze-embed-nomom", "adamw")


def main() -> None:
    print("fused_ft demo 1/3: memory of one training step at micro-batch 1 (simulated; paper Table 4)\n")
    rows = memory_report.run_table(memory_report.DEFAULT_MODELS, memory_report.DEFAULT_METHODS)
    print(memory_report.render_memory_table(rows, "table"))
    print("\n* gradients alive at the peak. 'AdamW +%' is how much more AdamW needs than the method; "
          "the paper measured the whole GPU process")
    print("(CUDA context, allocator caching, mixed-precision copies), which adds the same amount to every method.\n")
    print("fused_ft demo 2/3: beyond the paper, CLIP ViT-L/14 at micro-batch 1\n")
    runs = memory_report.beyond_the_paper()
    adamw = runs[0][1].peak
    for label, p in runs:
        print(f"  {label:<78} peak {p.peak / GIB:6.2f} GiB   AdamW / this = {adamw / p.peak:4.2f}x")
    best = max(runs, key=lambda run: adamw / run[1].peak)
    print(f"\nfp32 AdamW needs {adamw / best[1].peak:.1f}x the memory of {best[0]}: bf16 weights halve what SGD "
          "keeps, and stochastic rounding\nkeeps the updates that rounding to nearest would lose "
          "(fused_ft.SGD(..., bf16_update='stochastic'); accuracy in benchmarks/RESULTS.md).\n")
    shift_lab_experiment()


def shift_lab_experiment(out: str = "runs/demo-shift-lab") -> None:
    """The accuracy experiment in small: 4 methods x the 3 middle LRs of their paper grids x 1 seed, 2 epochs."""
    import os

    from fused_ft import diagnostics, sweep
    from fused_ft.data import load_data
    from fused_ft.finetune import FinetuneConfig, build_model
    from fused_ft.methods import method

    print("fused_ft demo 3/3: shift-lab (style shift), tiny ViT pretrained with AdamW (cached after the first run)\n")
    base = FinetuneConfig(model="shift-lab-vit", data="shift-lab", method="sgd", lr=1e-3, epochs=2, batch_size=64,
                          out=out, pretrained="adamw")
    data = load_data("shift-lab")
    model = build_model(base, data.num_classes)
    batches = diagnostics.sample_batches(data.train, base.batch_size)
    verdict = diagnostics.verdict(diagnostics.layer_grad_norms(model, batches))
    print("layer-gradient verdict at initialisation:", verdict)
    lrs = {m: method(m).lr_grid[2:5] for m in SHORT_METHODS}
    results = sweep.run_sweep(base, list(SHORT_METHODS), lrs, [0], jobs=min(2, os.cpu_count() or 1))
    print(sweep.render_sweep_table(sweep.summarize(results), "table"))
    print("\nThe full experiment (3 seeds, the paper's 6-LR grids): fused-ft sweep --data shift-lab; "
          "results in benchmarks/RESULTS.md")
