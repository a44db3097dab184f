"""The demo behind `make demo`: the paper's memory table (Table 4) for the three CLIP models, simulated,
then a short shift-lab version of its accuracy experiment.

Parts 1 and 2 run on any machine in about 30 s: the models are built on the meta device and every
tensor of a training step is counted (fused_ft.memory). Part 2 is what fused_ft adds beyond the paper:
the optimizer step inside backward, which frees each gradient as soon as it is used, and bf16 weights
that still learn. Part 3 fine-tunes for a few minutes on the CPU.
"""
from __future__ import annotations

from fused_ft.memory import report

GIB = 2**30
SHORT_METHODS = ("sgd", "sgd-freeze-embed", "sgd-freeze-embed-nomom", "adamw")


def main() -> None:
    print("fused_ft demo 1/3: memory of one training step at micro-batch 1 (simulated; paper Table 4)\n")
    print(memory_table(report.DEFAULT_MODELS))
    print("\n* gradients alive at the peak. 'AdamW +%' is how much more AdamW needs than the method; "
          "the paper measured the whole GPU process")
    print("(CUDA context, allocator caching, mixed-precision copies), which adds the same amount to every method.\n")
    print("fused_ft demo 2/3: beyond the paper, CLIP ViT-L/14 at micro-batch 1\n")
    runs = report.beyond_the_paper()
    print("\n".join(beyond_the_paper_lines(runs)))
    adamw = runs[0][1].peak
    best = max(runs, key=lambda run: adamw / run[1].peak)
    print(f"\nfp32 AdamW needs {adamw / best[1].peak:.1f}x the memory of {best[0]}: bf16 weights halve what SGD "
          "keeps, and stochastic rounding\nkeeps the updates that rounding to nearest would lose "
          "(fused_ft.SGD(..., bf16_update='stochastic'); accuracy in benchmarks/RESULTS.md).\n")
    shift_lab_experiment()


# Parts 1 and 2 are functions of their own: the README shows their text, and tests/test_docs.py checks
# that it is what they print.
def memory_table(models=report.DEFAULT_MODELS, progress: bool = True) -> str:
    """Part 1: the paper's Table 4 (every default method, micro-batch 1, simulated)."""
    rows = report.run_table(models, report.DEFAULT_METHODS, progress=progress)
    return report.render_memory_table(rows, "table")


def beyond_the_paper_lines(runs) -> list[str]:
    """Part 2: each of :func:`report.beyond_the_paper`'s runs, its peak and AdamW's over it."""
    adamw = runs[0][1].peak
    return [f"  {label:<78} peak {p.peak / GIB:6.2f} GiB   AdamW / this = {adamw / p.peak:4.2f}x"
            for label, p in runs]


# Learning rates around each method's optimum for the tiny shift-lab ViT trained 2 epochs (benchmarks/
# RESULTS.md: the paper's grids, made for large models and 20+ epochs, put every optimum at their top edge).
DEMO_LRS = {"sgd": (0.003, 0.01, 0.03), "sgd-freeze-embed": (0.003, 0.01, 0.03),
            "sgd-freeze-embed-nomom": (0.03, 0.1, 0.3), "adamw": (3e-4, 1e-3, 3e-3)}
DEMO_SEEDS = (0, 1)


def shift_lab_experiment(out: str = "runs/demo-shift-lab") -> None:
    """The accuracy experiment in small: 4 methods x 3 LRs around their optima x 2 seeds, 2 epochs each."""
    import os

    from fused_ft.harness import diagnostics, sweep
    from fused_ft.harness.finetune import FinetuneConfig

    print("fused_ft demo 3/3: shift-lab (style shift), tiny ViT pretrained with AdamW (cached after the first run); "
          f"runs are written to {out if os.path.isabs(out) else './' + out}\n")
    base = FinetuneConfig(model="shift-lab-vit", data="shift-lab", method="sgd", lr=1e-3, epochs=2, batch_size=64,
                          out=out, pretrained="adamw")
    diagnosis = diagnostics.diagnose(base.model, base.data, pretrained=base.pretrained, head_seeds=DEMO_SEEDS,
                                     batch_size=base.batch_size, seed=DEMO_SEEDS[0])
    print("layer-gradient verdict at initialisation (the runs' own heads):", diagnosis.verdict)
    results = sweep.run_sweep(base, list(SHORT_METHODS), DEMO_LRS, list(DEMO_SEEDS), jobs=min(2, os.cpu_count() or 1))
    rows = sweep.summarize(results)
    print(sweep.render_sweep_table(rows, "table"))
    print("\n" + sweep.finding(rows))
    print("\nThe full experiment (3 seeds, the paper's 6-LR grids): fused-ft sweep --data shift-lab; "
          "results in benchmarks/RESULTS.md")
