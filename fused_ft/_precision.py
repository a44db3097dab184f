"""Dtype policy, in one leaf module that the optimizers and every kernel backend import.

- State of bf16/fp16 parameters is fp32; math is fp32; the parameter is stored once a step.
- How that one store rounds is the group's ``bf16_update`` (bf16 parameters only):

  ``"nearest"``    round to nearest-even (torch's ``copy_``). An update below half a bf16 ulp of
                   its weight is lost: lr 1e-3 x grad 1e-2 against a weight of 0.05 (ulp 2.4e-4).
  ``"stochastic"`` round up with probability equal to the distance to the lower neighbour, in ulps:
                   unbiased. Random bits come from a counter-based hash (below), so a fixed seed
                   gives the same bits on every run; no state.
  ``"kahan"``      keep what rounding dropped in a 16-bit compensation buffer (2 bytes a parameter,
                   optimizer state ``kahan_comp``) and add it back before the next update. The buffer
                   holds the dropped low 16 bits exactly, so weight + compensation is the fp32 result:
                   updates are fp32-exact. (A compensation kept as a bf16 *value*, as optimi does,
                   has 8 significant bits itself: once it grows past 2^8 updates' worth it stops
                   absorbing them, and a weight of 1.0 under steps of 1e-6 never moves.)

The reference versions here are the numerical oracle of the C++ and Triton kernels, which compute
the same integer arithmetic (``csrc/multi_tensor.h``, ``kernels/triton_kernels.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fused_ft._validation import Rule

__all__ = ["LOW_PRECISION", "BF16_UPDATES", "BF16_UPDATE", "PARAM_DTYPES", "param_dtype_of", "Rounding",
           "state_dtype", "new_state", "upcast", "store", "mix32", "stream_key", "tensor_key", "random_bits",
           "round_stochastic", "split_master", "merge_master"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
BF16_UPDATES = ("nearest", "stochastic", "kahan")
COMPENSATION_KEY = "kahan_comp"  # the state key of kahan's buffers (optimi's name)
BF16_UPDATE = Rule(kind="choice", choices=BF16_UPDATES)  # the optimizers', the profiler's and the harness's check

_MASK = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters over the 32-bit range
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B  # Wellons' "lowbias32" integer hash: a bijection, good avalanche


PARAM_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16}


def param_dtype_of(name: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"bf16"`` (or their torch names, or the dtypes) as a dtype; anything else refused."""
    if isinstance(name, torch.dtype) and name in PARAM_DTYPES.values():
        return name
    if isinstance(name, str) and name in PARAM_DTYPES:
        return PARAM_DTYPES[name]
    raise ValueError(f"Invalid param_dtype: {name!r} (choose from fp32, bf16)")


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Optimizer state is fp32 for low-precision parameters, the parameter's dtype otherwise."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def new_state(param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)


# -- random bits: counter-based, the same integers in every backend --------------------------------
def mix32(x: int) -> int:
    """lowbias32 of a Python int (host side: keys)."""
    x &= _MASK
    x ^= x >> 16
    x = (x * _MUL1) & _MASK
    x ^= x >> 15
    x = (x * _MUL2) & _MASK
    return x ^ (x >> 16)


def _mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of int64 tensors holding values in [0, 2^32) (int64 products wrap mod 2^64, which keeps
    the low 32 bits right)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK
    return x ^ (x >> 16)


def stream_key(seed: int, counter: int, shard: int = 0) -> int:
    """The key of one update call: the group's seed, how many updates the group has made and, for
    sharded parameters, which shard this process holds (shard 0 keeps the unsharded key)."""
    key = mix32(seed ^ mix32(counter))
    return mix32(key ^ mix32(shard * GOLDEN)) if shard else key


def tensor_key(key: int, position: int) -> int:
    """The key of the tensor at ``position`` of an update call's list."""
    return mix32(key + position * GOLDEN)


def random_bits(key: int, like: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64) per element of ``like``: ``mix32(index * GOLDEN + key)``, where index is the
    element's offset in memory (as the kernels walk a dense tensor)."""
    index = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    bits = _mix32_tensor((index * GOLDEN + key) & _MASK)
    if like.is_contiguous():
        return bits.view(like.shape)
    out = torch.empty_like(like, dtype=torch.int64)
    out.as_strided((like.numel(),), (1,)).copy_(bits)  # memory order (dense tensors: see kernels/_layout)
    return out


# -- the three stores ------------------------------------------------------------------------------
def round_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` to bf16, rounding up with probability (x - lower) / ulp: add 16 random bits below
    bf16's last mantissa bit, then truncate. (Integer adds carry into the exponent as they should;
    +-inf stay inf, the largest finite values may round to inf as often as they are close to it.)"""
    u = x.view(torch.int32) + (bits & 0xFFFF).to(torch.int32)
    rounded = (u >> 16).to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


def split_master(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` as (bf16 weight, int16 compensation): the weight is x rounded to nearest (ties away
    from zero), the compensation the signed low 16 bits that rounding dropped, so that
    ``merge_master`` gives back x exactly. NaN gives (NaN, 0)."""
    u = x.view(torch.int32) + 0x8000  # rounds the magnitude half-up; carries into the exponent as they should
    weight = (u >> 16).to(torch.int16).view(torch.bfloat16)
    comp = ((u & 0xFFFF) - 0x8000).to(torch.int16)
    nan = torch.isnan(x)
    return torch.where(nan, x.to(torch.bfloat16), weight), comp.masked_fill_(nan, 0)


def merge_master(weight: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """The fp32 value that a bf16 weight and its compensation stand for (see ``split_master``)."""
    return (weight.view(torch.int16).to(torch.int32) * 65536 + comp.to(torch.int32)).view(torch.float32)


@dataclass(frozen=True)
class Rounding:
    """How one update call stores its bf16 parameters, when not to nearest.

    ``mode`` is ``"stochastic"`` (``key``: the call's stream key, see ``stream_key``) or ``"kahan"``
    (``compensations``: one int16 buffer per parameter; for a parameter that is not bf16, any tensor
    of its size, never read or written).
    """

    mode: str
    key: int = 0
    compensations: Sequence[torch.Tensor] = ()

    @property
    def mode_code(self) -> int:
        """What the kernels take: 0 nearest, 1 stochastic, 2 kahan."""
        return BF16_UPDATES.index(self.mode)


def upcast(tensors: list[torch.Tensor], rounding: Rounding | None = None) -> list[torch.Tensor]:
    """fp32 working copies of low-precision tensors (others are returned as they are, no copy); with
    kahan, a bf16 parameter's copy is its exact fp32 value (weight and compensation merged)."""
    if rounding is not None and rounding.mode == "kahan":
        return [merge_master(t, c) if t.dtype == torch.bfloat16 else t.float() if t.dtype in LOW_PRECISION else t
                for t, c in zip(tensors, rounding.compensations)]
    return [t.float() if t.dtype in LOW_PRECISION else t for t in tensors]


def store(params: list[torch.Tensor], work: list[torch.Tensor], rounding: Rounding | None = None) -> None:
    """Write fp32 working copies back into their low-precision parameters, rounded as ``rounding`` says
    for bf16 ones (to nearest otherwise)."""
    for j, (p, w) in enumerate(zip(params, work)):
        if w is p:
            continue
        if rounding is None or p.dtype != torch.bfloat16:
            p.copy_(w)
        elif rounding.mode == "stochastic":
            p.copy_(round_stochastic(w, random_bits(tensor_key(rounding.key, j), w)))
        else:
            weight, comp = split_master(w)
            p.copy_(weight)
            rounding.compensations[j].copy_(comp)
