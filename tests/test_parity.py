"""Trajectory parity with the independent implementations (torch.optim for SGD/AdamW, timm for LARS/LAMB).

Each side trains its own copy of a real timm model (random weights) for 30 steps on the same
batches, with two param groups that differ in hyperparameters; parameters and state must match.
30 steps, not more: the reference backend does what torch and timm do, so a wrong formula shows at
the step where it first acts (bias corrections, momentum's first step, trust ratios from step 1), and
every case then runs a few dozen steps with it; the long kernel trajectories are test_kernels' and
test_bf16_update's. 100 steps made this file a third of the suite's time on 2 cores.
"""
import pytest
import torch

from fused_ft.testing.specs import OPTIMIZERS
from tests.helpers import (MODELS, assert_params_close, assert_state_close, batches, make_model, train_step, twin,
                           two_groups)

STEPS = 30
# every variant on the ViT; on the ResNet the first two of LARS and LAMB, whose trust ratios are norms over
# whole tensors (4-d convolution weights, batch-norm vectors); SGD's and AdamW's updates are elementwise,
# blind to a tensor's shape, so a second model adds time, not cases (the suite runs on 2 cores)
SHAPE_AWARE = ("lars", "lamb")
CASES = [
    pytest.param(spec.name, variant, model, id=f"{spec.name}-{variant}-{model}")
    for spec in OPTIMIZERS.values()
    for i, variant in enumerate(spec.variants)
    for model in MODELS
    if model.startswith("vit") or (i < 2 and spec.name in SHAPE_AWARE)
]


def _second_group(spec_name: str, kwargs: dict) -> dict:
    """Different hyperparameters for the biases/norms group: half the lr, no weight decay (timm's exclusion)."""
    return {"lr": kwargs["lr"] * 0.5, "weight_decay": 0.0}


@pytest.mark.parametrize("opt_name,variant,model_name", CASES)
def test_trajectory_matches_reference(opt_name, variant, model_name):
    spec = OPTIMIZERS[opt_name]
    kwargs = dict(spec.variants[variant])
    ours_model = make_model(model_name)
    ref_model = twin(ours_model)
    overrides = _second_group(opt_name, kwargs)
    ours = spec.cls(two_groups(ours_model, **overrides), **kwargs, backend="reference")
    ref = spec.reference(two_groups(ref_model, **overrides), **kwargs)
    for x, y in batches(STEPS):
        loss_ours = train_step(ours_model, ours, x, y)
        loss_ref = train_step(ref_model, ref, x, y)
    assert torch.isfinite(loss_ours) and torch.isfinite(loss_ref)
    tol = dict(rtol=spec.reference_rtol, atol=spec.reference_rtol * 1e-2)
    assert_params_close(ours_model, ref_model, **tol)
    assert_state_close(ours, ref, **tol)
    # the run must have moved the weights, or the comparison above proves nothing
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(ours_model.parameters(), make_model(model_name).parameters()))
