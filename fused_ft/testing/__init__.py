"""Test and benchmark data, kept out of what ``import fused_ft`` loads (as ``torch.testing`` is).

``fused_ft.testing.specs`` is the registry the tests, benchmarks and CLI tools read: each optimizer's
independent reference (torch.optim or timm.optim), its trajectory tolerance, its option variants and
refusal regexes, and the five kernel updates with their roofline byte counts.
"""
