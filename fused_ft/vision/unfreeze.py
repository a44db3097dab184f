"""Gradual unfreezing (Kumar et al., Table 5 and Appendix A), as an epoch-wise LR scheduler.

The optimizer comes from ``create_optimizer(model, "gradual-unfreeze")``: one param group per layer,
bottom to top, all frozen but the head. At epoch ``t`` (0-indexed) of ``T`` the top
``ceil(L (t+1) / T)`` of the ``L`` layers train, so the last epoch trains everything, and every
learning rate is the base one times ``exp(3.73 (1 - t/(T-1)))`` (41.7x at epoch 0, 1x at the last):
fewer trainable layers want a larger step, as head tuning does. No cosine schedule.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from fused_ft._validation import check_positive_int

__all__ = ["GradualUnfreeze", "UNFREEZE_LR_EXPONENT", "unfreeze_lr_factor", "trainable_layers"]

UNFREEZE_LR_EXPONENT = 3.73  # the paper's constant: head tuning's best LR over full fine-tuning's on Waterbirds


def unfreeze_lr_factor(epoch: int, epochs: int) -> float:
    """``exp(3.73 (1 - t/(T-1)))``; 1 when there is a single epoch."""
    if epochs <= 1:
        return 1.0
    return math.exp(UNFREEZE_LR_EXPONENT * (1.0 - min(epoch, epochs - 1) / (epochs - 1)))


def trainable_layers(epoch: int, epochs: int, num_layers: int) -> int:
    """How many layers, counted from the top, train at ``epoch``: all of them in the last epoch."""
    return min(num_layers, max(1, math.ceil(num_layers * (min(epoch, epochs - 1) + 1) / epochs)))


class GradualUnfreeze(LRScheduler):
    """Unfreeze layer groups from the top, one share per epoch, with the paper's LR multiplier.

    Call ``step()`` once per epoch, after the epoch (as torch's epoch-wise schedulers). It sets each
    group's ``frozen`` flag and its parameters' ``requires_grad``, and its ``lr``. The state lives in
    ``state_dict()`` (the epoch), so a resumed run continues where it stopped.

    Args:
        optimizer: a fused_ft optimizer whose groups are layers, bottom first (``create_optimizer(...,
            "gradual-unfreeze")`` builds it).
        epochs: ``T``, the number of epochs.

    Example:
        >>> import timm, fused_ft
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
        >>> opt = fused_ft.create_optimizer(model, "gradual-unfreeze", lr=1e-3)
        >>> sched = fused_ft.GradualUnfreeze(opt, epochs=4)
        >>> sum(not g["frozen"] for g in opt.param_groups) < len(opt.param_groups)
        True
    """

    def __init__(self, optimizer: Optimizer, epochs: int, last_epoch: int = -1) -> None:
        check_positive_int("epochs", epochs)
        if not all("frozen" in g for g in optimizer.param_groups):
            raise ValueError("Invalid optimizer: GradualUnfreeze needs a fused_ft optimizer (groups with 'frozen')")
        self.epochs = epochs
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        self._apply_freezing()
        factor = unfreeze_lr_factor(self.last_epoch, self.epochs)
        return [base * factor for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._apply_freezing()  # requires_grad is not in any state_dict: restore it from the epoch

    def _apply_freezing(self) -> None:
        groups = self.optimizer.param_groups
        k = trainable_layers(self.last_epoch, self.epochs, len(groups))
        for i, group in enumerate(groups):
            group["frozen"] = i < len(groups) - k
            for p in group["params"]:
                p.requires_grad_(not group["frozen"])
