"""Kernel backends: Triton launchers (``triton_launch``) and the C++ extension wrapper (``cpu``).

Only tensor lists and scalars cross into this package; param groups and state stay in fused_ft.optim.
"""
