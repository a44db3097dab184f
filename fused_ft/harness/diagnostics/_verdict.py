"""Does a model need freeze-embed? The embedding/median-middle gradient ratio, with its interval."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence, Union

import numpy as np

from fused_ft.harness.diagnostics._measure import LayerGradNorm

# The embedding counts as an outlier when its gradient norm is at least this many times the median
# middle layer's. The paper's CLIP ViT-B/16 embedding gradient is "about 5x larger" (Appendix B); the
# BiT ResNets, where SGD and AdamW tie, show no outlier. 3x sits between the two.
OUTLIER_RATIO = 3.0
LEVEL = 0.95
RESAMPLES = 2000
NOISE = "noise"  # the data name of standard-normal images with random labels: a smoke test, no advice

PAPER = ("the paper (Fig. 2, App. E): CLIP ViT-B/16 on DomainNet, the embedding an outlier (about 5x); "
         "BiT ResNets (SGD-pretrained), no outlier")

Runs = Union[Sequence[LayerGradNorm], Sequence[Sequence[LayerGradNorm]]]


@dataclass(frozen=True)
class Verdict:
    """The embedding's gradient norm over the median middle layer's, and what it means.

    ``embedding_ratio`` is ``G_embedding / median over middle layers of G_l`` (Eq. 3.1, averaged over
    head seeds and minibatches); ``low``/``high`` bound it at ``level`` (a crossed bootstrap over head
    seeds and minibatches, see :func:`bootstrap_grad_norms`). ``decision``: ``recommended`` when the
    whole interval lies at or above ``threshold``, ``not needed`` when it lies below, ``not
    separable`` when it straddles it. On ``data == "noise"`` there is no advice.
    """

    embedding_ratio: float
    low: float
    high: float
    threshold: float
    level: float
    head_seeds: int
    batches: int
    decision: str
    data: str | None = None

    @property
    def recommend_freeze_embed(self) -> bool:
        return self.decision == "recommended" and self.data != NOISE

    def to_dict(self) -> dict:
        return {**asdict(self), "recommend_freeze_embed": self.recommend_freeze_embed, "text": str(self)}

    def __str__(self) -> str:
        measured = (f"{self.head_seeds} head seed{'s' * (self.head_seeds != 1)} x {self.batches} "
                    f"minibatch{'es' * (self.batches != 1)}")
        if self.head_seeds * self.batches > 1:
            interval = f"{self.level:.0%} interval {self.low:.2f}-{self.high:.2f}x over {measured}"
        else:
            interval = f"no interval: {measured}"
        head = (f"embedding gradient norm = {self.embedding_ratio:.2f}x the median middle layer ({interval}; "
                f"outlier at >= {self.threshold:g}x)")
        if self.data == NOISE:
            return f"{head}: measured on noise images, a smoke test of the model, not advice about any data"
        advice = {"recommended": "freeze-embed is recommended (use sgd-freeze-embed)",
                  "not needed": "freeze-embed is not needed: the embedding gradient is not an outlier",
                  "not separable": (f"not separable: the interval straddles {self.threshold:g}x; measure with "
                                    "more --batches and --head-seeds, or compare sgd with sgd-freeze-embed")}
        return f"{head}: {advice[self.decision]}. Compare {PAPER}"


def grad_norm_table(runs: Runs) -> tuple[np.ndarray, list[LayerGradNorm]]:
    """``norms[s, b, l]``: ``||g_l||`` of head seed ``s``, minibatch ``b``, layer ``l`` (float64), and
    the first run's rows (names, roles). Rows without ``batch_grad_norms`` count as one minibatch."""
    if runs and isinstance(runs[0], LayerGradNorm):
        runs = [runs]
    if not runs or not runs[0]:
        raise ValueError("Invalid rows: no measurement was given")
    first = runs[0]
    table = []
    for run in runs:
        if [(r.layer, r.role) for r in run] != [(r.layer, r.role) for r in first]:
            raise ValueError("Invalid rows: the head seeds' runs measured different layers")
        table.append([r.batch_grad_norms or (r.grad_norm,) for r in run])
    counts = {len(norms) for run in table for norms in run}
    if len(counts) != 1:
        raise ValueError(f"Invalid rows: the runs hold different numbers of minibatches ({sorted(counts)})")
    return np.asarray(table, dtype=np.float64).transpose(0, 2, 1), list(first)


def bootstrap_grad_norms(norms: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``G[r, l]``: Eq. 3.1's layer means under ``resamples`` crossed bootstrap draws.

    Each draw resamples the head seeds and, independently, the minibatches (all head seeds saw the
    same minibatches), with replacement, and averages ``norms[s, b, l]`` over the drawn cells. The
    spread of a statistic of ``G`` over draws is its uncertainty from both sources. Deterministic
    for a given ``seed``.
    """
    seeds, batches, _ = norms.shape
    rng = np.random.default_rng(seed)
    ws = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=resamples).astype(np.float64)
    wb = rng.multinomial(batches, np.full(batches, 1 / batches), size=resamples).astype(np.float64)
    return np.einsum("rs,rb,sbl->rl", ws, wb, norms) / (seeds * batches)


def embedding_ratio(grad_norms: np.ndarray, roles: Sequence[str]) -> np.ndarray:
    """``G_embedding / median(G_middle)`` along the last axis of ``grad_norms`` (inf where the median is 0)."""
    roles = np.asarray(roles)
    if not (roles == "embedding").any() or not (roles == "middle").any():
        raise ValueError("Invalid rows: a verdict needs an embedding layer and at least one middle layer")
    embed = grad_norms[..., np.flatnonzero(roles == "embedding")[0]]
    median = np.median(grad_norms[..., roles == "middle"], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(median > 0, embed / np.where(median > 0, median, 1.0), math.inf)


def verdict(runs: Runs, threshold: float = OUTLIER_RATIO, level: float = LEVEL, resamples: int = RESAMPLES,
            seed: int = 0, data: str | None = None) -> Verdict:
    """Is the embedding's gradient an outlier against the middle layers, and can this measurement tell?

    Args:
        runs: the rows of :func:`layer_grad_norms` (one head seed), or one list of rows per head seed
            (:func:`grad_norms_over_head_seeds`).
        threshold: the ratio at which the embedding counts as an outlier (3x).
        level: the interval's coverage (0.95): the bootstrap percentiles ``(1 - level) / 2`` and
            ``(1 + level) / 2``.
        resamples, seed: the bootstrap's draws and its seed.
        data: what was measured on (``"noise"`` gives no advice).

    Raises:
        ValueError: no embedding or no middle layer, or runs that do not line up.

    Example:
        >>> from fused_ft.harness.diagnostics import LayerGradNorm
        >>> rows = [LayerGradNorm(0, "embedding", "embedding", 10, 6.0, 1.0, 6.0, 1.9, (5.0, 7.0)),
        ...         LayerGradNorm(1, "blocks.0", "middle", 10, 1.0, 1.0, 1.0, 0.3, (1.0, 1.0))]
        >>> v = verdict(rows)
        >>> v.embedding_ratio, v.low, v.high, v.decision
        (6.0, 5.0, 7.0, 'recommended')
    """
    if not 0 < level < 1:
        raise ValueError(f"Invalid level: {level} (a coverage between 0 and 1, e.g. 0.95)")
    norms, rows = grad_norm_table(runs)
    roles = [r.role for r in rows]
    ratio = float(embedding_ratio(norms.mean(axis=(0, 1)), roles))
    if norms.shape[0] * norms.shape[1] > 1:
        draws = embedding_ratio(bootstrap_grad_norms(norms, resamples, seed), roles)
        low, high = (float(x) for x in np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]))
    else:
        low = high = ratio
    decision = "recommended" if low >= threshold else "not needed" if high < threshold else "not separable"
    return Verdict(ratio, low, high, threshold, level, norms.shape[0], norms.shape[1], decision, data)
