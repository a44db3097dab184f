"""fused_ft inside other libraries' training loops.

- :mod:`fused_ft.integrations.timm`: ``register()`` adds the optimizers to timm's optimizer registry,
  so that ``timm.optim.create_optimizer_v2(model, "fusedftsgd", ...)`` and timm's train script build them.

HF ``transformers.Trainer``, Lightning and Accelerate take a ``torch.optim.Optimizer`` as it is and need
no adapter: the README's "Use with your trainer" shows each, and ``tests/test_integrations.py`` runs them
(checkpoint, resume, equal to the run uninterrupted).

May import the ground floor, kernels and optim; no part of fused_ft imports it. ``integrations.timm`` needs
timm>=1.0.12 (the [vision] extra brings timm).
"""
