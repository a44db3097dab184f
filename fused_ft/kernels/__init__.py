"""Kernel backends (reference, cpu, triton_launch, meta), their torch custom ops' boundary (_ops) and the C++
extension's loader (native, _jit, _build).
May import the ground floor and fused_ft._C only: tensor lists and scalars cross in, param groups stay in optim.
Needs no extra: torch (with its triton on Linux for the triton backend; a C++ compiler for the cpu one).
"""
