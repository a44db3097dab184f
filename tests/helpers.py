"""Shared test helpers: models with random weights, param groups, and a comparison that shows mismatches."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"

# timm models at tiny input sizes: real parameter lists, forward/backward in milliseconds on a CPU.
MODELS = {
    "vit_tiny_patch16_224": dict(img_size=32, num_classes=5),
    "resnet10t": dict(num_classes=5),
}
IMAGE_SIZE = 32


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **MODELS[name])


def two_groups(model: torch.nn.Module, **second_group_overrides) -> list[dict]:
    """timm-style groups: weights, then biases and norms (1-d tensors) with their own hyperparameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay}, {"params": no_decay, **second_group_overrides}]


def batches(n: int, batch_size: int = 4, seed: int = 1, num_classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield (torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
               torch.randint(0, num_classes, (batch_size,), generator=g))


def train_step(model, optimizer, x, y, scaler=None):
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def twin(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def assert_close_report(actual, expected, *, rtol: float, atol: float, what: str = "tensor") -> None:
    """assert_close, listing the first mismatching elements (index, actual, expected) on failure."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().reshape(-1), expected.detach().double().reshape(-1)
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero().reshape(-1)[:5].tolist()
        rows = ", ".join(f"[{i}] {a[i].item():.9g} vs {e[i].item():.9g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())}/{a.numel()} elements differ (rtol={rtol}, atol={atol}): {rows}")


def assert_close_tensorwise(actual, expected, *, rtol: float, what: str = "tensor") -> None:
    """max|actual - expected| <= rtol * max|expected|: relative to the tensor's scale.

    For comparing two implementations that sum or fuse in a different order: their differences are
    rounding-sized at the tensor's scale, which an elementwise relative check inflates near zero.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().double().reshape(-1), expected.detach().double().reshape(-1)
    assert torch.isfinite(e).all() and torch.isfinite(a).all(), f"{what}: non-finite values"
    allowed = rtol * max(e.abs().max().item(), 1e-30)
    bad = (a - e).abs() > allowed
    if bad.any():
        idx = bad.nonzero().reshape(-1)[:5].tolist()
        rows = ", ".join(f"[{i}] {a[i].item():.9g} vs {e[i].item():.9g}" for i in idx)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements differ by more than {rtol} x max|expected| "
            f"= {allowed:.3g}: {rows}"
        )


def assert_params_close(model_a, model_b, *, rtol: float, atol: float) -> None:
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert_close_report(a, b, rtol=rtol, atol=atol, what=name)


def assert_state_close(opt_a, opt_b, *, rtol: float, atol: float) -> None:
    """Compare per-parameter optimizer state, matched by position in the param groups."""
    pa = [p for g in opt_a.param_groups for p in g["params"]]
    pb = [p for g in opt_b.param_groups for p in g["params"]]
    for i, (x, y) in enumerate(zip(pa, pb)):
        sa, sb = opt_a.state.get(x, {}), opt_b.state.get(y, {})
        assert sa.keys() == sb.keys(), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sa:
            assert_close_report(sa[key], sb[key], rtol=rtol, atol=atol, what=f"param {i} state[{key!r}]")


def readme_block(marker: str) -> list[str]:
    """The lines of the README's code block that follows the comment ``<!-- {marker}...``: blocks the
    tests compare with what the code prints."""
    match = re.search(r"<!-- " + re.escape(marker) + r".*?-->\n```\n(.*?)```", README.read_text(), re.S)
    assert match, f"no code block after <!-- {marker} in README.md"
    return match.group(1).rstrip("\n").splitlines()


def freed_in_backward(optimizer) -> bool:
    """Has a step_in_backward ``optimizer`` freed its gradients in backward? All but the sentinel's: the
    smallest hooked parameter keeps its applied gradient until step() checks the loop around it
    (``FusedOptimizer._check_loop``), so each one is the same size tensor whatever the model."""
    hooked = [p for g in optimizer.param_groups if not g["frozen"] for p in g["params"] if p.requires_grad]
    sentinel = min(hooked, key=torch.Tensor.numel)
    return all(p.grad is None for p in hooked if p is not sentinel)

