"""Methods x learning rates x seeds, the paper's way (Sec. 4, Appendix A): pick each method's LR by
mean ID validation accuracy, report ID and OOD test accuracy at that LR as the mean over seeds with a
90% t-interval (Table 5's format). Runs are independent directories, so an interrupted sweep resumes
where it stopped, and they run in parallel worker processes.
"""
from __future__ import annotations

import math
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from fused_ft._validation import check_positive_number
from fused_ft import _tables
from fused_ft._extras import require
from fused_ft.harness.finetune import FinetuneConfig, finetune
from fused_ft.vision.methods import method as get_method

__all__ = ["run_sweep", "run_configs", "summarize", "finding", "render_sweep_table", "plot_sweep", "lr_grid"]

# two-sided 90% Student t quantiles by degrees of freedom (1.645 beyond)
_T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}


def lr_grid(method: str, spec: str = "paper", multiplier: float = 1.0) -> tuple[float, ...]:
    """``paper``: the method's 6-point grid (times ``multiplier``: small models from scratch-like
    pretraining want larger steps); otherwise comma-separated learning rates."""
    check_positive_number("lr multiplier", multiplier)
    if spec == "paper":
        return tuple(float(f"{lr * multiplier:.3g}") for lr in get_method(method).lr_grid)
    try:
        lrs = tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"Invalid lr-sweep: {spec!r} (use 'paper' or comma-separated numbers)") from None
    if not lrs or any(not math.isfinite(lr) or lr <= 0 for lr in lrs):
        raise ValueError(f"Invalid lr-sweep: {spec!r} (learning rates must be finite and > 0)")
    if len(set(lrs)) < len(lrs):  # one run directory per lr: a repeat would be counted twice
        raise ValueError(f"Invalid lr-sweep: {spec!r} (learning rates must be distinct)")
    return lrs


def _run_dir(out: Path, method: str, lr: float, seed: int) -> Path:
    return out / method / f"lr{lr:g}" / f"seed{seed}"


def _worker(config_dict: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # one thread per worker process: more oversubscribes the cores
    return finetune(FinetuneConfig(**config_dict))


def run_configs(base: FinetuneConfig, methods: Sequence[str], lrs: str | dict[str, Sequence[float]],
                seeds: Sequence[int], lr_multiplier: float = 1.0) -> list[FinetuneConfig]:
    """The sweep's runs: ``base`` for every (method, lr, seed), each in its own folder under ``base.out``."""
    for m in methods:
        get_method(m)
    grids = {m: (lr_grid(m, lrs, lr_multiplier) if isinstance(lrs, str) else tuple(lrs[m])) for m in methods}
    out = Path(base.out)
    return [replace(base, method=m, lr=lr, seed=s, out=str(_run_dir(out, m, lr, s)), progress=False)
            for m in methods for lr in grids[m] for s in seeds]


def run_sweep(base: FinetuneConfig, methods: Sequence[str], lrs: str | dict[str, Sequence[float]],
              seeds: Sequence[int], jobs: int = 1, lr_multiplier: float = 1.0) -> list[dict[str, Any]]:
    """Every (method, lr, seed) run under ``base.out``; finished runs are read back, not redone."""
    from tqdm import tqdm

    configs = run_configs(base, methods, lrs, seeds, lr_multiplier)
    from fused_ft.harness.data import shift_lab

    if base.model in shift_lab.SHIFT_LAB_MODELS:  # pretrain once, before the workers race to fill the cache
        from fused_ft.harness.finetune import build_model

        build_model(base, 2)
    results = []
    with tqdm(total=len(configs), desc="sweep", unit="run", disable=not base.progress) as bar:
        if jobs <= 1:
            for c in configs:
                results.append(finetune(c))
                bar.update()
        else:
            import multiprocessing

            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_worker, asdict(c)) for c in configs]
                for f in as_completed(futures):
                    results.append(f.result())
                    bar.update()
    return sorted(results, key=lambda r: (methods.index(r["method"]), r["lr"], r["seed"]))


def _interval(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = _T90.get(len(values) - 1, 1.645)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the LR with the best mean ID validation accuracy and its test accuracies (mean, 90% half-width)."""
    ood_keys = sorted({k for r in results for k in r if k.startswith("ood_test")})
    rows = []
    for m in dict.fromkeys(r["method"] for r in results):
        by_lr: dict[float, list] = {}
        for r in results:
            if r["method"] == m:
                by_lr.setdefault(r["lr"], []).append(r)
        best_lr = max(by_lr, key=lambda lr: (statistics.fmean(r["id_val"] for r in by_lr[lr]), -lr))
        runs = by_lr[best_lr]
        row = {"method": m, "lr": best_lr, "seeds": len(runs),
               "lr_at_grid_edge": best_lr in (min(by_lr), max(by_lr)) and len(by_lr) > 1}
        for key in ["id_val", "id_test", *ood_keys]:
            row[key], row[key + "_ci90"] = _interval([100 * r[key] for r in runs])
        rows.append(row)
    return rows


def finding(rows: list[dict[str, Any]], metric: str = "ood_test") -> str:
    """One sentence on what a summary shows: the best method on ``metric`` and whether the others' 90%
    intervals overlap it, and any optimum at its grid's edge (a grid that should be widened)."""
    best = max(rows, key=lambda r: r[metric])
    low = best[metric] - best[metric + "_ci90"]
    tied = [r["method"] for r in rows if r is not best and r[metric] + r[metric + "_ci90"] >= low]
    name = metric.replace("_", " ")
    sentence = (f"{best['method']} has the best {name} accuracy ({best[metric]:.1f} ± {best[metric + '_ci90']:.1f}, "
                f"{best['seeds']} seeds)")
    sentence += (f", but the 90% intervals of {', '.join(tied)} overlap it, so this run does not separate them"
                 if tied else ", clear of every other method's 90% interval")
    edges = [r["method"] for r in rows if r["lr_at_grid_edge"]]
    sentence += (f"; the best lr of {', '.join(edges)} sits at its grid's edge, so its grid should be widened."
                 if edges else "; every method's best lr lies inside its grid.")
    return sentence


def render_sweep_table(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    keys = [k for k in rows[0] if k.startswith(("id_", "ood_")) and not k.endswith("_ci90")]
    header = ["method", "lr"] + [k.replace("_", " ") for k in keys]
    return _tables.render(rows, fmt, header, lambda r: [
        r["method"], f"{r['lr']:g}" + (" (edge)" if r["lr_at_grid_edge"] else ""),
        *(f"{r[k]:.1f} ± {r[k + '_ci90']:.1f}" for k in keys)])


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """ID and OOD test accuracy per method with 90% intervals over seeds."""
    matplotlib = require("matplotlib", "plotting a sweep")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k.startswith(("id_test", "ood_")) and not k.endswith("_ci90")]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 4))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, yerr=[r[key + "_ci90"] for r in rows], capsize=3,
               label=key.replace("_", " "))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["method"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("accuracy (%), mean ± 90% CI")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
