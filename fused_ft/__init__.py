"""fused_ft: cheaper, better fine-tuning of vision models.

Drop-in ``torch.optim``/``timm.optim`` optimizers with frozen param groups and fused backends,
built on Kumar et al., "How to Fine-Tune Vision Models with SGD" (arXiv 2211.09359): freeze the
embedding layer and SGD matches or beats AdamW with far less memory.
"""
from fused_ft._dispatch import BACKENDS, BackendUnavailableError, available_backends
from fused_ft.optim import LAMB, LARS, SGD, AdamW

__version__ = "0.1.0"
__all__ = ["SGD", "AdamW", "LARS", "LAMB", "BACKENDS", "BackendUnavailableError", "available_backends"]
