"""Launchers for the Triton kernels: tensor lists and scalars in, kernel launches out.

One launch covers every tensor of a group that shares a dtype combination (and, for the rare
mixed cases, a first-step flag or an AdamW step count), so the launch count does not grow with
the number of tensors. ``launches()`` and ``compiled_variants()`` let tests check both bounds.
"""
from __future__ import annotations

import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import triton
import triton.language as tl

from fused_ft.kernels import triton_kernels as K
from fused_ft.kernels._layout import flat_slots, new_momentum_buffers, kernel_unsupported_reason

__all__ = ["sgd", "adamw", "lars", "lamb", "lamb_clip", "launches", "compiled_variants", "unsupported_reason"]

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
RBLOCK = 1024  # partial sums read per iteration when reducing a tensor's norm
CLIP_PROGRAMS = 1024  # LAMB's global clip is split into at most this many partial sums
BLOCK_OVERRIDE: int | None = None  # elements per program; None picks per device (tests shrink it)

_LAUNCHES: Counter = Counter()
_VARIANTS: set = set()


def launches() -> Counter:
    """Kernel launches so far, by kernel name (a live Counter: copy it to take a snapshot)."""
    return _LAUNCHES


def compiled_variants() -> int:
    """Distinct specializations launched so far: what Triton's JIT compiles one kernel for each of.

    Keyed as the JIT keys its cache: kernel, constexpr values, argument dtypes, integer arguments
    equal to 1 or divisible by 16, and pointer alignment. Floats (lr, bias corrections) are not keys.
    """
    return len(_VARIANTS)


def _block(device: torch.device) -> int:
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE
    # the interpreter runs each program in Python: few wide programs are far faster there
    return 2048 if device.type == "cuda" else 1 << 15


def unsupported_reason(optimizer: str, options: Mapping[str, Any], dtypes: frozenset) -> str | None:
    return kernel_unsupported_reason("triton", optimizer, options, dtypes)


def _spec(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool):
        return ("b", arg)
    if isinstance(arg, int):
        return ("i", arg == 1, arg % 16 == 0)
    return type(arg).__name__


def _launch(kernel, grid: int, *args, **constexprs) -> None:
    if grid == 0:
        return
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    _VARIANTS.add((name, tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(_spec(a) for a in args)))
    _LAUNCHES[name] += 1
    _execute(kernel, grid, args, constexprs)


def _execute(kernel, grid: int, args: tuple, constexprs: dict) -> None:
    kernel[(grid,)](*args, **constexprs)


# -- tensor tables -------------------------------------------------------------------------------
@dataclass
class _Table:
    """Device-side description of one launch's tensors: an address table per slot, and blocks."""

    addrs: list[torch.Tensor]
    numels: torch.Tensor
    blk_t: torch.Tensor
    blk_s: torch.Tensor
    blk_first: torch.Tensor
    blk_count: torch.Tensor
    num_blocks: int
    block: int


_TABLES: OrderedDict = OrderedDict()  # the same tensors every step: build tables once (no host-to-device copy)
_MAX_TABLES = 256


def _table(slots: Sequence[Sequence[torch.Tensor]], device: torch.device) -> _Table:
    block = _block(device)
    numels = [t.numel() for t in slots[0]]
    key = (device, block, tuple(numels), tuple(tuple(t.data_ptr() for t in slot) for slot in slots))
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table
    blk_t, blk_s, first, count = [], [], [], []
    for i, n in enumerate(numels):
        first.append(len(blk_t))
        starts = range(0, n, block)
        blk_t.extend([i] * len(starts))
        blk_s.extend(starts)
        count.append(len(starts))

    def dev(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    table = _Table(
        addrs=[dev([t.data_ptr() for t in slot]) for slot in slots], numels=dev(numels),
        blk_t=dev(blk_t, torch.int32), blk_s=dev(blk_s), blk_first=dev(first), blk_count=dev(count),
        num_blocks=len(blk_t), block=block,
    )
    _TABLES[key] = table
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return table


def _run(
    slots: list[list[torch.Tensor]], written: Sequence[int], keys: Sequence[Any], body: Callable[[Any, _Table], None]
) -> None:
    """Split tensors by ``keys`` and call ``body(key, table)`` once per split.

    Tensors that cannot be read as flat memory (overlapping or oddly strided views) are processed
    through contiguous copies, copied back into the ``written`` slots afterwards.
    """
    splits: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        if slots[0][i].numel():
            splits.setdefault(key, []).append(i)
    for key, index in splits.items():
        with flat_slots([[slot[i] for i in index] for slot in slots], written) as chosen:
            body(key, _table(chosen, chosen[0][0].device))


# -- updates (same signatures as the reference implementations) ---------------------------------
def sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    has_momentum = momentum != 0
    new = new_momentum_buffers(params, momentum_buffers) if has_momentum else [False] * len(params)
    slots = [list(params), list(grads)] + ([momentum_buffers] if has_momentum else [])
    keys = [(p.dtype, g.dtype, n) for p, g, n in zip(params, grads, new)]

    def body(key, t: _Table) -> None:
        p_dtype, g_dtype, is_new = key
        _launch(
            K.sgd_kernel, t.num_blocks, t.addrs[0], t.addrs[1], t.addrs[-1], t.numels, t.blk_t, t.blk_s,
            lr, weight_decay, -1.0 if maximize else 1.0, 0.0 if is_new else momentum,
            1.0 if is_new else 1.0 - dampening, momentum,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], HAS_MOMENTUM=has_momentum,
            NESTEROV=nesterov, BLOCK=t.block,
        )

    _run(slots, written=(0, 2) if has_momentum else (0,), keys=keys, body=body)


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step_sizes, bias_correction2_sqrts, lr, beta1, beta2,
    eps, weight_decay, amsgrad, maximize,
):
    slots = [list(params), list(grads), exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    keys = [(p.dtype, g.dtype, s, b) for p, g, s, b in zip(params, grads, step_sizes, bias_correction2_sqrts)]

    def body(key, t: _Table) -> None:
        p_dtype, g_dtype, step_size, bias_correction2_sqrt = key
        _launch(
            K.adamw_kernel, t.num_blocks, *t.addrs[:4], t.addrs[-1], t.numels, t.blk_t, t.blk_s,
            1.0 - lr * weight_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
            -1.0 if maximize else 1.0,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], AMSGRAD=amsgrad, BLOCK=t.block,
        )

    _run(slots, written=(0, 2, 3, 4) if amsgrad else (0, 2, 3), keys=keys, body=body)


def lars(
    params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps,
    trust_clip, always_adapt,
):
    has_momentum = momentum != 0
    adapt = weight_decay != 0 or always_adapt
    new = new_momentum_buffers(params, momentum_buffers) if has_momentum else [False] * len(params)
    slots = [list(params), list(grads)] + ([momentum_buffers] if has_momentum else [])
    keys = [(p.dtype, g.dtype, n) for p, g, n in zip(params, grads, new)]

    def body(key, t: _Table) -> None:
        p_dtype, g_dtype, is_new = key
        dtypes = dict(P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype])
        partials = torch.empty(2, t.num_blocks if adapt else 1, device=t.numels.device)
        if adapt:
            _launch(K.sumsq_kernel, t.num_blocks, t.addrs[0], t.addrs[1], t.numels, t.blk_t, t.blk_s,
                    t.num_blocks, partials[0], partials[1], A_DTYPE=dtypes["P_DTYPE"], B_DTYPE=dtypes["G_DTYPE"],
                    TWO=True, BLOCK=t.block)
        _launch(
            K.lars_kernel, t.num_blocks, t.addrs[0], t.addrs[1], t.addrs[-1], t.numels, t.blk_t, t.blk_s,
            partials[0], partials[1], t.blk_first, t.blk_count,
            lr, weight_decay, trust_coeff, eps, 0.0 if is_new else momentum, 1.0 if is_new else 1.0 - dampening,
            momentum, **dtypes, HAS_MOMENTUM=has_momentum, NESTEROV=nesterov, ADAPT=adapt, TRUST_CLIP=trust_clip,
            BLOCK=t.block, RBLOCK=RBLOCK,
        )

    _run(slots, written=(0, 2) if has_momentum else (0,), keys=keys, body=body)


@dataclass
class _Clip:
    """LAMB's global clipping as partial sums of squares on the device (no host sync)."""

    partials: torch.Tensor
    max_grad_norm: float


def lamb_clip(grads: list[torch.Tensor], max_grad_norm: float | None) -> _Clip | None:
    """Partial sums of squares of all gradients: one launch per gradient dtype, no host sync."""
    if max_grad_norm is None or not grads:
        return None
    pieces = []

    def body(key, t: _Table) -> None:
        programs = min(t.num_blocks, CLIP_PROGRAMS)
        out = torch.empty(programs, device=t.numels.device)
        _launch(K.sumsq_kernel, programs, t.addrs[0], t.addrs[0], t.numels, t.blk_t, t.blk_s, t.num_blocks,
                out, out, A_DTYPE=_TL_DTYPES[key], B_DTYPE=_TL_DTYPES[key], TWO=False, BLOCK=t.block)
        pieces.append(out)

    _run([list(grads)], written=(), keys=[g.dtype for g in grads], body=body)
    partials = torch.cat(pieces) if len(pieces) > 1 else pieces[0] if pieces else torch.zeros(1, device=grads[0].device)
    return _Clip(partials, float(max_grad_norm))


def lamb(
    params, grads, exp_avgs, exp_avg_sqs, *, clip, lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
    weight_decay, decoupled_decay_factor, adapt, trust_clip, caution,
):
    if caution:
        raise AssertionError("dispatch routes caution=True to the reference backend")
    slots = [list(params), list(grads), exp_avgs, exp_avg_sqs]
    keys = [(p.dtype, g.dtype) for p, g in zip(params, grads)]
    decay = 1.0 - decoupled_decay_factor
    bc2_sqrt = bias_correction2**0.5

    def body(key, t: _Table) -> None:
        p_dtype, g_dtype = key
        partials = torch.empty(2, t.num_blocks, device=t.numels.device)
        clip_partials = clip.partials if clip is not None else partials[0]
        _launch(
            K.lamb_moments_kernel, t.num_blocks, *t.addrs, t.numels, t.blk_t, t.blk_s,
            clip_partials, clip_partials.numel(), clip.max_grad_norm if clip is not None else 1.0,
            partials[0], partials[1], beta1, beta2, beta3, bias_correction1, bc2_sqrt, eps, weight_decay, decay,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], HAS_CLIP=clip is not None,
            AVERAGING=beta3 == 1 - beta1, BLOCK=t.block, RBLOCK=RBLOCK,
        )
        _launch(
            K.lamb_apply_kernel, t.num_blocks, t.addrs[0], t.addrs[2], t.addrs[3], t.numels, t.blk_t, t.blk_s,
            partials[0], partials[1], t.blk_first, t.blk_count,
            lr, bias_correction1, bc2_sqrt, eps, weight_decay, decay,
            P_DTYPE=_TL_DTYPES[p_dtype], ADAPT=adapt, TRUST_CLIP=trust_clip, BLOCK=t.block, RBLOCK=RBLOCK,
        )

    _run(slots, written=(0, 2, 3), keys=keys, body=body)
