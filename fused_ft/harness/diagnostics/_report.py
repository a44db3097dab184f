"""The diagnostic's outputs: a per-layer summary over head seeds, the CSV, the table and Figure 2."""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fused_ft._extras import require
from fused_ft.harness.diagnostics._measure import LayerGradNorm
from fused_ft.harness.diagnostics._verdict import LEVEL, RESAMPLES, Runs, Verdict, bootstrap_grad_norms, grad_norm_table


@dataclass(frozen=True)
class LayerSummary:
    """One layer over every head seed and minibatch: ``grad_norm`` is the mean, ``low``/``high`` its
    bootstrap interval (the same draws as the verdict's)."""

    index: int
    layer: str
    role: str
    num_params: int
    grad_norm: float
    low: float
    high: float
    param_norm: float  # of the first head seed's model: only the head's differs between seeds

    @property
    def grad_over_param_norm(self) -> float:
        return self.grad_norm / self.param_norm if self.param_norm > 0 else math.inf

    @property
    def grad_over_sqrt_params(self) -> float:
        return self.grad_norm / math.sqrt(self.num_params)


def summarize(runs: Runs, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> list[LayerSummary]:
    norms, rows = grad_norm_table(runs)
    means = norms.mean(axis=(0, 1))
    if norms.shape[0] * norms.shape[1] > 1:
        low, high = np.quantile(bootstrap_grad_norms(norms, resamples, seed), [(1 - level) / 2, (1 + level) / 2],
                                axis=0)
    else:
        low = high = means
    return [LayerSummary(r.index, r.layer, r.role, r.num_params, float(means[i]), float(low[i]), float(high[i]),
                         r.param_norm) for i, r in enumerate(rows)]


def write_csv(runs: Runs, path: str | Path) -> Path:
    """One row per head seed and layer (:class:`LayerGradNorm`'s fields; ``batch_grad_norms``
    space-separated)."""
    if runs and isinstance(runs[0], LayerGradNorm):
        runs = [runs]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["head_seed"] + [f for f in asdict(runs[0][0]) if f != "head_seed"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            for r in run:
                row = asdict(r)
                row["batch_grad_norms"] = " ".join(repr(x) for x in r.batch_grad_norms)
                writer.writerow(row)
    return path


def render_table(summary: list[LayerSummary], level: float = LEVEL) -> str:
    head = (f"{'#':>3} {'layer':<30} {'role':<9} {'params':>10} {'grad norm':>10} {f'{level:.0%} interval':>21} "
            f"{'/param norm':>11} {'/sqrt(n)':>10}")
    lines = [head]
    for r in summary:
        interval = f"{r.low:.4g}-{r.high:.4g}"
        lines.append(f"{r.index:>3} {r.layer[:30]:<30} {r.role:<9} {r.num_params:>10} {r.grad_norm:>10.4g} "
                     f"{interval:>21} {r.grad_over_param_norm:>11.4g} {r.grad_over_sqrt_params:>10.4g}")
    return "\n".join(lines)


_STYLE = {"embedding": ("s", "red"), "middle": ("o", "black"), "head": ("^", "green")}


def plot_grad_norms(runs: Runs, path: str | Path, title: str = "", verdict: Verdict | None = None) -> Path:
    """Figure 2 of the paper, with error bars: per-layer gradient norms (log scale), embedding red
    square, head green triangle, middle layers black circles; each point is the mean over head seeds
    and minibatches and its bar the bootstrap interval. The two normalised panels leave out the
    head, as the paper's Appendix F does (its random initialisation dwarfs the rest). A fourth panel
    shows the embedding/median-middle ratio with its interval against the outlier threshold."""
    matplotlib = require("matplotlib", "plotting gradient norms")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    panels = [(1.0, "gradient norm", True), ("param", "gradient norm / parameter norm", False),
              ("sqrt", "gradient norm / sqrt(#params)", False)]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4), gridspec_kw={"width_ratios": [4, 4, 4, 1.3]})
    for ax, (scale, label, with_head) in zip(axes, panels):
        for role, (marker, color) in _STYLE.items():
            rows = [r for r in summary if r.role == role and (with_head or role != "head")]
            if not rows:
                continue
            div = [1.0 if scale == 1.0 else (r.param_norm if scale == "param" else math.sqrt(r.num_params))
                   for r in rows]
            y = np.array([r.grad_norm for r in rows]) / div
            err = np.array([[r.grad_norm - r.low for r in rows], [r.high - r.grad_norm for r in rows]]) / div
            ax.errorbar([r.index for r in rows], y, yerr=err, fmt=marker, color=color, ecolor=color, capsize=3,
                        markersize=8 if role != "middle" else 5, label=role, zorder=3 if role != "middle" else 2)
        ax.set_yscale("log")
        ax.set_xlabel("layer (bottom to top)")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        if not with_head:
            ax.set_title("head left out: the new random head's gradient dwarfs the rest", fontsize=8)
    ratio_ax = axes[3]
    if verdict is not None:
        ratio_ax.errorbar([0], [verdict.embedding_ratio], yerr=[[verdict.embedding_ratio - verdict.low],
                                                                [verdict.high - verdict.embedding_ratio]],
                          fmt="s", color="red", capsize=5, markersize=9)
        ratio_ax.axhline(verdict.threshold, color="gray", linestyle="--", label=f"outlier at {verdict.threshold:g}x")
        ratio_ax.axhline(1.0, color="black", linewidth=0.6)
        ratio_ax.set_title(verdict.decision if verdict.data != "noise" else "noise: no advice", fontsize=9)
        ratio_ax.legend(loc="best", fontsize=8)
        ratio_ax.set_ylim(0, 1.25 * max(verdict.high, verdict.threshold))
    ratio_ax.set_xticks([])
    ratio_ax.set_ylabel(f"embedding / median middle ({LEVEL:.0%} interval)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
