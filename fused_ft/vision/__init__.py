"""The paper's models and methods: models by name, the embedding layer, layers, gradual unfreezing, METHODS.
May import the ground floor, fused_ft.kernels and fused_ft.optim; timm and open_clip only inside functions.
Needs the [vision] extra (timm, open_clip_torch, torchvision) to build a model by name.
"""
