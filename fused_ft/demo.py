"""The demo behind `make demo`: a few training steps of each update on a small timm model.

Prints time per step and optimizer-state bytes for every update, with and without freezing the
patch embedding, so the memory side of the paper's finding is visible in seconds on a laptop.
"""
from __future__ import annotations

import time

import torch

from fused_ft.specs import OPTIMIZERS, UPDATES
from fused_ft.utils import optimizer_state_bytes

DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_IMAGE_SIZE = 64  # small images keep the demo's forward/backward to milliseconds on a CPU


def _param_groups(model: torch.nn.Module, freeze_embed: bool) -> list[dict]:
    embed = [p for n, p in model.named_parameters() if n.startswith("patch_embed.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("patch_embed.")]
    if not freeze_embed:
        return [{"params": embed + rest}]
    for p in embed:
        p.requires_grad_(False)  # frozen: no gradient memory either
    return [{"params": rest}, {"params": embed, "frozen": True}]


def run_update(update_name: str, freeze_embed: bool, steps: int = 5, batch_size: int = 8, seed: int = 0) -> dict:
    """Train ``steps`` steps of one update; return seconds per step (after one warm-up) and state bytes."""
    import timm

    torch.manual_seed(seed)
    update = UPDATES[update_name]
    model = timm.create_model(DEMO_MODEL, pretrained=False, num_classes=10, img_size=DEMO_IMAGE_SIZE)
    optimizer = OPTIMIZERS[update.optimizer].cls(_param_groups(model, freeze_embed), **update.kwargs)
    x = torch.randn(batch_size, 3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    y = torch.randint(0, 10, (batch_size,))
    step_times = []
    for _ in range(steps + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        start = time.perf_counter()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
    return {
        "update": update_name,
        "freeze_embed": freeze_embed,
        "step_ms": 1000 * sum(step_times[1:]) / steps,
        "state_bytes": optimizer_state_bytes(optimizer),
        "loss": loss.item(),
    }


def main() -> None:
    print(f"fused_ft demo: {DEMO_MODEL} (random weights, {DEMO_IMAGE_SIZE}px), optimizer step only")
    print(f"{'update':<10} {'freeze-embed':>12} {'ms/step':>9} {'state MiB':>10}")
    for name in UPDATES:
        for freeze in (False, True):
            r = run_update(name, freeze)
            print(f"{name:<10} {str(freeze):>12} {r['step_ms']:9.2f} {r['state_bytes'] / 2**20:10.2f}")
