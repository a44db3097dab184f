"""The ``fused-ft memory`` table: the paper's Table 4 with a per-category breakdown, and its plot.

Every method's peak is compared with plain AdamW's (same model, batch, checkpointing; never step in
backward), the paper's baseline, and beside it the paper's own numbers where it has them.
"""
from __future__ import annotations

from typing import Iterable

import torch

from fused_ft import _tables
from fused_ft._extras import require
from fused_ft._precision import param_dtype_of
from fused_ft.memory.profile import CATEGORIES, MemoryProfile, profile_memory

__all__ = ["DEFAULT_MODELS", "DEFAULT_METHODS", "PAPER_ADAMW_OVERHEAD", "run_table",
           "render_memory_table", "plot_memory_table"]

DEFAULT_MODELS = ("clip-vit-b16", "clip-vit-l14", "openclip-vit-h14")
DEFAULT_METHODS = ("sgd", "sgd-freeze-embed", "sgd-freeze-embed-nomom", "adamw", "lars", "lamb")
# Table 4 (Titan-X, micro-batch 1): how much more memory AdamW used than each method, as a fraction
# (the unit of adamw_overhead), and whether it is a lower bound: ViT-H/14 did not fit with AdamW.
PAPER_ADAMW_OVERHEAD = {
    ("clip-vit-b16", "sgd-freeze-embed"): (0.16, False), ("clip-vit-b16", "sgd-freeze-embed-nomom"): (0.36, False),
    ("clip-vit-l14", "sgd-freeze-embed"): (0.18, False), ("clip-vit-l14", "sgd-freeze-embed-nomom"): (0.48, False),
    ("openclip-vit-h14", "sgd-freeze-embed"): (0.20, True),
    ("openclip-vit-h14", "sgd-freeze-embed-nomom"): (0.60, True),
}
GIB = 2**30


def run_table(
    models: Iterable[str], methods: Iterable[str], *, batch_size: int = 1, step_in_backward: bool = False,
    grad_checkpointing: bool = False, progress: bool = True, param_dtype: str = "fp32",
    bf16_updates: Iterable[str] = ("nearest",), skipped: list[str] | None = None,
) -> list[dict]:
    """Profile every model x method (simulated); each row adds fp32 AdamW's peak for the ratio. With
    ``param_dtype="bf16"`` every method has a row per mode of ``bf16_updates``. With ``skipped`` (a
    list), a method that cannot step in backward (LAMB's global clipping) is left out, with the reason
    appended there, instead of raising."""
    from tqdm import tqdm

    models, methods = list(models), list(methods)
    updates = list(bf16_updates) if param_dtype_of(param_dtype) == torch.bfloat16 else ["nearest"]
    jobs = [(m, meth, u) for m in models for meth in methods for u in updates]
    rows = []
    baselines: dict[str, MemoryProfile] = {}
    with tqdm(total=len(jobs) + len(models), desc="profiling", disable=not progress, unit="run") as bar:
        for model in models:
            bar.set_postfix_str(f"{model} adamw (baseline)")
            baselines[model] = profile_memory(model, "adamw", batch_size=batch_size,
                                              grad_checkpointing=grad_checkpointing)
            bar.update()
            for meth, update in ((meth, u) for meth in methods for u in updates):
                bar.set_postfix_str(f"{model} {meth}")
                try:
                    if meth == "adamw" and not step_in_backward and param_dtype_of(param_dtype) == torch.float32:
                        p = baselines[model]  # the same step, already profiled
                    else:
                        p = profile_memory(model, meth, batch_size=batch_size, grad_checkpointing=grad_checkpointing,
                                           step_in_backward=step_in_backward, param_dtype=param_dtype,
                                           bf16_update=update)
                except ValueError as exc:
                    if skipped is None or "step_in_backward" not in str(exc):
                        raise
                    note = f"{meth}: not profiled: {exc}"
                    if note not in skipped:
                        skipped.append(note)
                    bar.update()
                    continue
                bar.update()
                base = baselines[model].peak
                rows.append({
                    **{k: v for k, v in p.as_dict().items() if k != "extra"},
                    "adamw_peak": base,
                    "ratio_to_adamw": p.peak / base,
                    "adamw_overhead": base / p.peak - 1,
                    # the paper trained fp32 weights: its numbers sit beside fp32 rows only
                    "paper_adamw_overhead": paper[0] if (paper := _paper(model, meth, p)) else None,
                    "paper_adamw_overhead_is_lower_bound": bool(paper and paper[1]),
                })
    return rows


def _paper(model: str, meth: str, profile: MemoryProfile) -> tuple[float, bool] | None:
    return PAPER_ADAMW_OVERHEAD.get((model, meth)) if profile.param_dtype == "float32" else None


def method_label(row: dict) -> str:
    """``sgd-freeze-embed-nomom bf16/stochastic (in-backward)``: the method and how its weights are kept."""
    weights = f" bf16/{row['bf16_update']}" if row.get("param_dtype") == "bfloat16" else ""
    return row["method"] + weights + (" (in-backward)" if row["step_in_backward"] else "")


def render_memory_table(rows: list[dict], fmt: str = "table") -> str:
    header = ["model", "method", "params GiB", "grads GiB*", "state GiB", "activ. GiB", "peak GiB",
              "/ AdamW", "AdamW +%", "paper AdamW +%"]
    return _tables.render(rows, fmt, header, lambda r: [
        r["model"], method_label(r),
        *(f"{r[c] / GIB:.2f}" for c in CATEGORIES), f"{r['peak'] / GIB:.2f}", f"{r['ratio_to_adamw']:.2f}",
        f"{100 * r['adamw_overhead']:+.0f}%", _paper_cell(r)], text_columns=2)


def _paper_cell(row: dict) -> str:
    if row["paper_adamw_overhead"] is None:
        return "-"
    return f"{'>= ' if row['paper_adamw_overhead_is_lower_bound'] else ''}{100 * row['paper_adamw_overhead']:+.0f}%"


def plot_memory_table(rows: list[dict], path) -> None:
    """Stacked bars (parameters, gradients, optimizer state, activations) per model and method."""
    matplotlib = require("matplotlib", "plotting the memory table")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.5), squeeze=False)
    colors = {"parameters": "#4c72b0", "gradients_at_peak": "#dd8452", "optimizer_state": "#c44e52",
              "activations": "#8c8c8c"}
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        bottom = [0.0] * len(mine)
        for c in CATEGORIES:
            values = [r[c] / GIB for r in mine]
            ax.bar(range(len(mine)), values, bottom=bottom, color=colors[c], label=c.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.axhline(mine[0]["adamw_peak"] / GIB, color="black", linestyle="--", linewidth=1, label="AdamW peak")
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([method_label(r) for r in mine], rotation=35, ha="right", fontsize=8)
        ax.set_title(model)
        ax.set_ylabel("GiB at the peak of a training step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    # one row of legend fits above two or more panels; above a single 5-inch panel it was cut off
    columns = len(labels) if len(models) > 1 else 3
    fig.legend(handles, labels, loc="upper center", ncol=columns, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if len(models) > 1 else 0.86))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def beyond_the_paper(model: str = "clip-vit-l14", batch_size: int = 1) -> list[tuple[str, MemoryProfile]]:
    """fp32 AdamW against SGD (freeze-embed, no momentum) updated inside backward, with fp32 weights and
    with bf16 weights that keep learning (stochastic rounding, or kahan's 2-byte compensation), and
    with checkpointing. The first row is the baseline."""
    nomom_in_backward = dict(method="sgd-freeze-embed-nomom", step_in_backward=True)
    runs = [
        ("adamw", dict(method="adamw")),
        ("adamw + checkpointing", dict(method="adamw", grad_checkpointing=True)),
        ("sgd-freeze-embed-nomom, step in backward", nomom_in_backward),
        ("sgd-freeze-embed-nomom, step in backward + checkpointing",
         dict(**nomom_in_backward, grad_checkpointing=True)),
        ("sgd-freeze-embed-nomom, step in backward, bf16 weights + stochastic rounding",
         dict(**nomom_in_backward, param_dtype="bf16", bf16_update="stochastic")),
        ("sgd-freeze-embed-nomom, step in backward, bf16 weights + kahan",
         dict(**nomom_in_backward, param_dtype="bf16", bf16_update="kahan")),
    ]
    return [(label, profile_memory(model, batch_size=batch_size, **kw)) for label, kw in runs]
