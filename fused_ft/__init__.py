"""fused_ft: cheaper, better fine-tuning of vision models.

Drop-in ``torch.optim``/``timm.optim`` optimizers with frozen param groups and fused backends,
built on Kumar et al., "How to Fine-Tune Vision Models with SGD" (arXiv 2211.09359): freeze the
embedding layer and SGD matches or beats AdamW with far less memory.
"""
from fused_ft.optim import LAMB, LARS, SGD, AdamW
from fused_ft.optim._dispatch import BACKENDS, BackendUnavailableError, available_backends
from fused_ft.vision.embedding import EmbeddingNotFound, embedding_params, freeze_embedding
from fused_ft.vision.methods import METHODS, create_optimizer
from fused_ft.vision.models import create_model
from fused_ft.vision.unfreeze import GradualUnfreeze
from fused_ft.memory import profile_memory
from fused_ft.harness.diagnostics import layer_grad_norms

__version__ = "0.1.0"
__all__ = [
    "SGD", "AdamW", "LARS", "LAMB", "BACKENDS", "BackendUnavailableError", "available_backends",
    "embedding_params", "freeze_embedding", "EmbeddingNotFound", "METHODS", "create_optimizer",
    "GradualUnfreeze", "layer_grad_norms", "create_model", "profile_memory",
]
