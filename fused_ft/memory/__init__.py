"""The memory profiler: ``profile`` (one training step's bytes by category), ``report`` (the memory table).
May import the ground floor, kernels, optim and vision; this face re-exports ``profile``'s public names.
Needs the [vision] extra for models by name, [plots] for the table's plot.
"""
from fused_ft.memory.profile import (CATEGORIES, MemoryProfile, cuda_workspace_bytes, optimizer_state_bytes,
                                     profile_memory, training_step)

__all__ = ["MemoryProfile", "profile_memory", "training_step", "cuda_workspace_bytes", "optimizer_state_bytes",
           "CATEGORIES"]
