"""Test and benchmark data, kept out of what ``import fused_ft`` loads (as ``torch.testing`` is).

``fused_ft.testing.specs`` is the registry the tests, benchmarks and CLI tools read: each optimizer's
independent reference (torch.optim or timm.optim), its trajectory tolerance, its option variants and
refusal regexes, and the five kernel updates with their roofline byte counts.

May import the ground floor, kernels and optim; no part of fused_ft imports it. Needs no extra to import; the
LARS and LAMB references need timm (the [vision] extra).
"""
