"""What the kernel backends (``cpu``, ``triton``) implement: auto skips them, and a backend named
explicitly refuses, for anything else."""
from __future__ import annotations

import torch

__all__ = ["kernel_unsupported_reason"]


def kernel_unsupported_reason(backend: str, optimizer: str, options, dtypes) -> str | None:
    """What the kernel backends (triton, cpu) cannot run: other dtypes than fp32/fp16/bf16, LAMB's caution."""
    supported = (torch.float32, torch.float16, torch.bfloat16)
    odd = sorted(str(d) for d in dtypes if d not in supported)
    if odd:
        return (f"backend={backend!r} supports float32, float16 and bfloat16 tensors, not {', '.join(odd)}; "
                "use 'reference'")
    if optimizer == "lamb" and options.get("caution"):
        return "LAMB caution=True is implemented by backend='reference' only"
    return None
