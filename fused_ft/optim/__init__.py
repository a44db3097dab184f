"""fused_ft's optimizers: one module per family (class, functional), their shared step, the backend dispatch.
May import the ground floor and fused_ft.kernels; nothing from vision, memory or harness.
Needs no extra: torch alone.
"""
from fused_ft.optim.adamw import AdamW
from fused_ft.optim.lamb import LAMB
from fused_ft.optim.lars import LARS
from fused_ft.optim.sgd import SGD

__all__ = ["SGD", "AdamW", "LARS", "LAMB", "OPTIMIZER_CLASSES"]

# The optimizers by registry name, for runtime use (the method factory); the tests' registry, with
# references and tolerances, is fused_ft.testing.specs.
OPTIMIZER_CLASSES = {"sgd": SGD, "adamw": AdamW, "lars": LARS, "lamb": LAMB}
