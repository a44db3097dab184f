"""Launchers for the Triton kernels: tensor lists and scalars in, kernel launches out.

One launch covers every tensor of a group that shares a dtype combination (and, for the rare
mixed cases, a first-step flag or an AdamW step count), so the launch count does not grow with
the number of tensors: SGD and AdamW launch once, LARS three times (block sums, tensor sums,
the SGD kernel with its trust ratio), LAMB four times (global clip, moments, tensor sums, apply). ``launches()`` and
``compiled_variants()`` let tests check both bounds.

Host work per step is O(number of tensors) with small constants. The block table depends on the
tensors' sizes and BLOCK only and is cached on them; the address tables (one row per slot) are
cached on the data pointers, and rebuilt, when the pointers change (new gradients after
``zero_grad()``), with one tensor op and one copy.

Launch configuration: on CUDA every kernel runs 1024 elements a program at 4 warps, or 8 warps where
it stores fp32 state beside a 16-bit stream (see ``_CUDA_WARPS_MIXED``), chosen from the compiled
sm_80/sm_90 code (``python -m benchmarks.triton_report``): at most 64 registers a thread, no spills,
128-bit accesses (64-bit for those 16-bit streams). ``FUSED_FT_TRITON_TARGET=cuda`` makes
the launcher choose exactly that configuration in Triton's CPU interpreter too, so the variants a
GPU would compile can be captured and compiled on a machine without one.
"""
from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import triton
from torch import Tensor
import triton.language as tl

from fused_ft._precision import BF16_UPDATES, Rounding, tensor_key
from fused_ft.kernels import triton_kernels as K
from fused_ft.kernels._layout import compensation_slot, flat_addresses, flat_slots, momentum_slots
from fused_ft.kernels._ops import dispatch, host, per_tensor
from fused_ft.kernels.capabilities import kernel_unsupported_reason

__all__ = ["UPDATES", "sgd", "adamw", "lars", "lamb", "lamb_clip", "launches", "compiled_variants",
           "unavailable_reason", "unsupported_reason", "MIN_TRITON", "FLOOR", "floor_from", "release",
           "below_floor_reason",
           "launch_config"]

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.int16: tl.int16}
_TL_16BIT = (tl.float16, tl.bfloat16)
ALIGN = 16  # bytes: what the kernels' tl.multiple_of hints promise for every tensor's address
RBLOCK = 1024  # block sums read per iteration when reducing a tensor's (or the clip's) sums
CLIP_CHUNK = 32  # blocks per partial sum of LAMB's global clip: 32K elements on CUDA
BLOCK_OVERRIDE: int | None = None  # elements per program; None picks per target (tests shrink it)
GRID_LIMIT: int | None = None  # caps the programs of the grid-striding reductions (tests: same bits)

# 1024 elements a program: 8 a thread at 4 warps, so each fp32 stream takes two 128-bit accesses a
# thread and each 16-bit stream one. Except where a kernel stores fp32 state next to a 16-bit stream
# (bf16/fp16 parameters with momentum or moments): Triton's coalescer gives fp32 stores at most 4
# elements a thread, so 8-element 16-bit accesses would need a layout conversion through shared
# memory (sm_90: 96 registers and 4 KiB for AdamW bf16). Those kernels run 8 warps, 4 elements a
# thread: fp32 streams stay 128-bit, 16-bit streams are 64-bit, and every warp-wide access is still
# one contiguous 256- or 512-byte segment (32 registers, no shared memory). benchmarks/RESULTS.md
# has every variant's registers and access widths.
_CUDA_BLOCK = 1024
_CUDA_WARPS = 4
_CUDA_WARPS_MIXED = 8
# The interpreter runs each program in Python: few wide programs are far faster there.
_INTERPRETER_BLOCK = 1 << 15

_LAUNCHES: Counter = Counter()
_VARIANTS: set = set()


def launches() -> Counter:
    """Kernel launches so far, by kernel name (a live Counter: copy it to take a snapshot)."""
    return _LAUNCHES


def compiled_variants() -> int:
    """Distinct specializations launched so far: what Triton's JIT compiles one kernel for each of.

    Keyed as the JIT keys its cache: kernel, num_warps, constexpr values, which arguments are None,
    and each tensor argument's dtype and 16-byte alignment. Floats (lr, bias corrections) and the
    counts marked do_not_specialize are not keys.
    """
    return len(_VARIANTS)


# The oldest Triton these kernels are checked on, in Triton's CPU interpreter (COMPAT.md, make compat;
# no GPU has run them compiled on 3.2 or 3.1 yet). Triton 3.1, torch 2.5's, is refused: its interpreter
# gets the kernels' bf16 stores and stochastic rounding wrong, so under torch 2.5 auto takes the reference
# backend on CUDA, saying so once. FUSED_FT_TRITON_FLOOR=3.1 lowers the floor, to check an older Triton
# on a GPU (python -m benchmarks.gpu_check) before claiming it.
MIN_TRITON = (3, 2)


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a Triton version string ("3.2.0+git1a2b" -> (3, 2)); (0, 0) if it has none."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def floor_from(environ: Mapping[str, str]) -> tuple[int, int]:
    """The floor in force: ``FUSED_FT_TRITON_FLOOR`` ("3.1") where set, else ``MIN_TRITON``."""
    override = environ.get("FUSED_FT_TRITON_FLOOR")
    return release(override) if override else MIN_TRITON


# read once: the override is set for a whole run (a GPU check of an older Triton), and the backend asks
# on every step of every CUDA group
FLOOR = floor_from(os.environ)


def below_floor_reason(version: str | None = None) -> str | None:
    """Why Triton ``version`` (default: the one imported) is below the kernels' floor, or None when it is not."""
    return _below_floor_reason(triton.__version__ if version is None else version, FLOOR)


@functools.lru_cache(maxsize=None)
def _below_floor_reason(version: str, floor: tuple[int, int]) -> str | None:
    if release(version) >= floor:
        return None
    torch_floor = ", which comes with torch >= 2.6" if floor == MIN_TRITON else ""  # an override's may not
    return (f"backend='triton' needs Triton >= {floor[0]}.{floor[1]}{torch_floor}; this "
            f"environment has Triton {version} (torch {torch.__version__}), on which fused_ft's kernels are "
            "not checked (COMPAT.md): upgrade torch for the triton backend")


def unavailable_reason(device: torch.device) -> str | None:
    """Kernels run on CUDA tensors, or on CPU ones in Triton's interpreter (``TRITON_INTERPRET=1``),
    with Triton >= ``MIN_TRITON``. Where the tensors cannot go comes first: it is the user's to fix."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda" and not interpret and not torch.cuda.is_available():
        return "backend='triton' needs a CUDA device, and torch sees none (torch.cuda.is_available() is False)"
    if device.type != "cuda" and not interpret:
        return (f"backend='triton' needs CUDA tensors, but the parameters are on {device}; use backend='auto' "
                "or 'cpu', or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) CPU interpreter")
    return below_floor_reason()


def unsupported_reason(optimizer: str, options: Mapping[str, Any], dtypes: frozenset) -> str | None:
    return kernel_unsupported_reason("triton", optimizer, options, dtypes)


@dataclass(frozen=True)
class LaunchConfig:
    block: int
    num_warps: int


_CUDA = LaunchConfig(_CUDA_BLOCK, _CUDA_WARPS)
_INTERPRETER = LaunchConfig(_INTERPRETER_BLOCK, _CUDA_WARPS)


def launch_config(device: torch.device) -> LaunchConfig:
    """What the kernels run with for tensors on ``device`` (see the module doc for the CUDA choice)."""
    config = _CUDA if device.type == "cuda" or os.environ.get("FUSED_FT_TRITON_TARGET") == "cuda" else _INTERPRETER
    return config if BLOCK_OVERRIDE is None else LaunchConfig(BLOCK_OVERRIDE, config.num_warps)


def _warps(config: LaunchConfig, t: _Tables, stores_fp32_state: bool) -> int:
    """num_warps of a kernel: 8 where it stores fp32 state beside a 16-bit stream (see _CUDA_WARPS_MIXED)."""
    mixed = stores_fp32_state and (t.dtype["params"] in _TL_16BIT or t.dtype.get("grads") in _TL_16BIT)
    return _CUDA_WARPS_MIXED if mixed else config.num_warps


def _launch(kernel, grid: int, num_warps: int, **kwargs) -> None:
    if grid == 0:
        return
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    # The key Triton's JIT compiles a variant for (see compiled_variants), inline because it runs
    # for every launch. Call sites pass keywords in a fixed order, so it needs no sorting.
    _VARIANTS.add((name, num_warps, *kwargs, *[
        (v.dtype, v.data_ptr() % 16 == 0) if type(v) is torch.Tensor else v if k.isupper() or v is None else None
        for k, v in kwargs.items()
    ]))
    _LAUNCHES[name] += 1
    _execute(kernel, grid, kwargs, num_warps)


def _execute(kernel, grid: int, kwargs: dict, num_warps: int) -> None:
    kernel[(grid,)](**kwargs, num_warps=num_warps)


def _reduction_grid(work_items: int) -> int:
    return work_items if GRID_LIMIT is None else min(work_items, GRID_LIMIT)


# -- tensor tables -------------------------------------------------------------------------------
@dataclass
class _Blocks:
    """The block table of one list of tensor sizes (it depends on the sizes and BLOCK only).

    Program ``pid`` updates elements ``block_start[pid]`` to ``+ BLOCK`` of tensor ``block_tensor[pid]``;
    tensor ``t``'s blocks are ``first_block[t]`` to ``+ block_count[t]``. ``workspace`` holds the
    reductions' scratch tensors, reused from step to step (kernels on one stream run in order).
    """

    numels: torch.Tensor
    block_tensor: torch.Tensor
    block_start: torch.Tensor
    first_block: torch.Tensor
    block_count: torch.Tensor
    num_blocks: int
    num_tensors: int
    block: int
    workspace: dict = field(default_factory=dict)

    def scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A scratch tensor kept with the table, zero-filled when created. Each row starts 16-byte
        aligned (rows padded to 16 bytes), so its rows' specializations never depend on the list."""
        t = self.workspace.get(name)
        if t is None:
            *rows, n = shape
            padded = -(-n * dtype.itemsize // 16) * 16 // dtype.itemsize
            full = torch.zeros((*rows, padded), dtype=dtype, device=self.numels.device)
            t = self.workspace[name] = full[..., :n]
        return t

    def geometry(self) -> dict[str, Any]:
        return dict(numels=self.numels, block_tensor=self.block_tensor, block_start=self.block_start, BLOCK=self.block)


_BLOCKS: OrderedDict = OrderedDict()
_ADDRESSES: OrderedDict = OrderedDict()
_MAX_CACHED = 256


def _cached(cache: OrderedDict, key: Any, build: Callable[[], Any]) -> Any:
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > _MAX_CACHED:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _build_blocks(numels: list[int], block: int, device: torch.device) -> _Blocks:
    sizes = torch.tensor(numels, dtype=torch.int64)
    counts = (sizes + block - 1) // block
    first = torch.cumsum(counts, 0) - counts
    num_blocks = int(counts.sum())
    block_tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    block_start = (torch.arange(num_blocks) - first[block_tensor]) * block
    # one host-to-device copy for the whole table; every part starts 16-byte aligned, so the
    # kernels' pointer specializations do not depend on the number of tensors or blocks
    parts = [sizes, first, counts, block_tensor, block_start]
    padded = [torch.nn.functional.pad(x, (0, len(x) % 2)) for x in parts]
    table = torch.cat(padded).to(device)
    views, offset = [], 0
    for x, y in zip(parts, padded):
        views.append(table[offset:offset + len(x)])
        offset += len(y)
    return _Blocks(
        numels=views[0], first_block=views[1], block_count=views[2], block_tensor=views[3], block_start=views[4],
        num_blocks=num_blocks, num_tensors=len(numels), block=block,
    )


def _copyable_to(device: torch.device) -> torch.device:
    """``device``, where a new table may be copied now: not inside a CUDA graph capture, which cannot record a
    copy from pageable host memory. A captured step reuses the tables of the warm-up step before the capture,
    so its tensors must be the same: gradients kept between steps (``zero_grad(set_to_none=False)``), not
    allocated inside the captured region."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "Invalid CUDA graph capture of a fused_ft step: its tensors (parameters, gradients, state) are not "
            "those of the step before the capture, and the triton backend's address tables cannot be copied to "
            "the device inside a capture; run a warm-up step on the same tensors first, and keep the gradients "
            "allocated (optimizer.zero_grad(set_to_none=False)) so that backward writes into them"
        )
    return device


@dataclass
class _Tables:
    """One launch's tensors as the kernels see them: an address row and a dtype per slot, the block
    table, and the launch's share of ``extra`` (see ``_run``)."""

    slot: dict[str, torch.Tensor]
    dtype: dict[str, Any]  # triton.language dtypes
    blocks: _Blocks
    extra: Any
    first: int = 0  # the list position of the launch's first tensor (launches split by dtype start later)


def _tables(names, addresses, numels, dtypes, extra, block, device, first=0) -> _Tables:
    """Device tables from host ones: cached on the element counts (blocks) and on the addresses."""
    blocks = _cached(_BLOCKS, (device, block, *numels.tolist()),
                     lambda: _build_blocks(numels.tolist(), block, _copyable_to(device)))
    rows = _cached(_ADDRESSES, (device, len(names), addresses.numpy().tobytes()),
                   lambda: addresses.to(_copyable_to(device)).unbind(0))
    return _Tables(dict(zip(names, rows)), {n: _TL_DTYPES.get(d, d) for n, d in zip(names, dtypes)}, blocks, extra,
                   first)


def _run(
    slots: Mapping[str, list[torch.Tensor]], written: Sequence[str], body: Callable[[_Tables], None], block: int,
    extra: Sequence[Any] | None = None, side: Mapping[str, list[torch.Tensor]] | None = None,
) -> None:
    """Call ``body(tables)`` once per launch: one for the whole list when every slot holds one dtype and
    ``extra`` (a per-tensor value that needs its own launch: a first-step flag, a step size) is the
    same for all tensors, else once per distinct (dtypes, extra).

    ``side`` slots hold a tensor per parameter of another size (AdamW's 0-dim step counts): address rows
    beside the others, read by the kernel where they are, never copied.

    Tensors that cannot be read as flat, 16-byte-aligned memory (overlapping, oddly strided or
    offset views) are processed through contiguous copies, copied back into the ``written`` slots.
    """
    names = list(slots) + list(side or {})
    columns = list(slots.values())
    sides = list((side or {}).values())
    device = columns[0][0].device
    addresses, numels, not_flat, one_dtype = flat_addresses(columns, ALIGN)
    if one_dtype and (extra is None or extra.count(extra[0]) == len(extra)):
        splits = {None: None}
    else:
        splits = {}
        for i in range(len(columns[0])):
            key = (tuple(column[i].dtype for column in columns), None if extra is None else extra[i])
            splits.setdefault(key, []).append(i)
    for index in splits.values():
        chosen = columns if index is None else [[column[i] for i in index] for column in columns]
        chosen_sides = sides if index is None else [[column[i] for i in index] for column in sides]
        if index is not None:
            addresses, numels, not_flat, _ = flat_addresses(chosen, ALIGN)
        dtypes = [column[0].dtype for column in chosen] + [column[0].dtype for column in chosen_sides]
        share = None if extra is None else extra[0 if index is None else index[0]]
        first = 0 if index is None else index[0]
        if not not_flat:
            body(_tables(names, _with_sides(addresses, chosen_sides), numels, dtypes, share, block, device, first))
            continue
        with flat_slots(chosen, [names.index(n) for n in written if n in names], align=ALIGN) as flat:
            addresses, numels, _, _ = flat_addresses(flat, ALIGN)
            body(_tables(names, _with_sides(addresses, chosen_sides), numels, dtypes, share, block, device, first))


def _with_sides(addresses: torch.Tensor, sides: list[list[torch.Tensor]]) -> torch.Tensor:
    """The address table with a row per side slot (padded as ``flat_addresses`` pads its rows)."""
    if not sides:
        return addresses
    rows = torch.tensor([[t.data_ptr() for t in column] for column in sides], dtype=torch.int64)
    return torch.cat([addresses, torch.nn.functional.pad(rows, (0, addresses.shape[1] - rows.shape[1]))])


# -- updates (same signatures as the reference implementations) ---------------------------------
def _rounding_args(t: _Tables, rounding: Rounding | None) -> dict[str, Any]:
    """The kernels' ROUNDING code and key for one launch: bf16 parameters only. The kernel derives each
    tensor's key from the launch's key and the tensor's place in the launch, as the reference does from
    its place in the list; a launch split off a mixed list starts from its first tensor's key."""
    if rounding is None or t.dtype["params"] != tl.bfloat16:
        return dict(ROUNDING=0, rounding_key=0, compensation_ptrs=None)
    key = rounding.key if t.first == 0 else tensor_key(rounding.key, t.first)
    return dict(ROUNDING=rounding.mode_code, rounding_key=key - (1 << 32) if key >= 1 << 31 else key,  # int32 bits
                compensation_ptrs=t.slot.get("compensations"))


def _momentum_args(momentum: float, dampening: float, is_new: bool | None) -> dict[str, float]:
    """b = keep*b + scale*d; a new buffer (zeros) starts at the gradient itself, undampened, as in torch."""
    return dict(buf_keep=0.0 if is_new else momentum, buf_scale=1.0 if is_new else 1.0 - dampening,
                momentum=momentum)


def _sgd_launch(t: _Tables, config: LaunchConfig, sums: torch.Tensor | None, rounding: Rounding | None, *, lr,
                momentum, dampening, weight_decay, nesterov, grad_sign=1.0, trust_coeff=0.0, eps=0.0,
                trust_clip=False, grad_scale=None, found_inf=None) -> None:
    """The SGD kernel for SGD, and for LARS when ``sums`` holds the per-tensor sums of squares."""
    _launch(
        K.sgd_kernel, t.blocks.num_blocks, _warps(config, t, stores_fp32_state=momentum != 0),
        param_ptrs=t.slot["params"], grad_ptrs=t.slot["grads"],
        momentum_buffer_ptrs=t.slot.get("momentum_buffers"),
        **t.blocks.geometry(), param_sumsq=None if sums is None else sums[0],
        grad_sumsq=None if sums is None else sums[1], grad_scale=grad_scale, found_inf=found_inf,
        lr=lr, weight_decay=weight_decay, grad_sign=grad_sign,
        **_momentum_args(momentum, dampening, t.extra), trust_coeff=trust_coeff, eps=eps,
        P_DTYPE=t.dtype["params"], G_DTYPE=t.dtype["grads"], HAS_MOMENTUM=momentum != 0, NESTEROV=nesterov,
        ADAPT=sums is not None, TRUST_CLIP=trust_clip, **_rounding_args(t, rounding),
    )


# Each update is the backend contract's function (below: it prepares what the step created, such as new
# momentum buffers) around its launches (``_<update>_launches``), which it calls directly in an eager step and
# through a torch custom op under torch.compile (fused_ft.kernels._ops): the launches build address tables from
# data pointers, which Dynamo's fake tensors lack, so they are not traced, and the op is not a graph break.
# (``torch.library.triton_op`` would trace each launch with its tensor arguments; ours take address tables.)
def _rounding_call_args(rounding: Rounding | None) -> dict[str, Any]:
    return dict(rounding_mode=0 if rounding is None else rounding.mode_code,
                rounding_key=0 if rounding is None else rounding.key,
                compensations=list(rounding.compensations) if rounding is not None else [])


def _rounding_of(rounding_mode: int, rounding_key: int, compensations: list[torch.Tensor]) -> Rounding | None:
    return None if rounding_mode == 0 else Rounding(BF16_UPDATES[rounding_mode], rounding_key, compensations)


def _unscaled(grad_scale: torch.Tensor | None) -> tuple[str, ...]:
    """The grads are a written slot where the kernel stores them unscaled."""
    return () if grad_scale is None else ("grads",)


def sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
        rounding=None, grad_scale=None, found_inf=None):
    if not params:
        return
    slots, _, new = momentum_slots(params, grads, momentum_buffers, momentum)
    dispatch("triton_sgd_", _sgd_launches, params=params, grads=grads,
             momentum_buffers=slots.get("momentum_buffers", []), new_buffer=new or [], lr=lr, momentum=momentum,
             dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
             **_rounding_call_args(rounding), grad_scale=grad_scale, found_inf=found_inf)


def _momentum_run_slots(params, grads, momentum_buffers, momentum, rounding):
    slots, written = {"params": params, "grads": grads}, ("params",)
    if momentum != 0:
        slots["momentum_buffers"], written = momentum_buffers, ("params", "momentum_buffers")
    slots.update(compensation_slot(rounding))
    return slots, (*written, "compensations")


def _sgd_launches(params, grads, momentum_buffers, new_buffer, *, lr, momentum, dampening, weight_decay, nesterov,
                  maximize, rounding_mode, rounding_key, compensations, grad_scale, found_inf):
    config = launch_config(params[0].device)
    rounding = _rounding_of(rounding_mode, rounding_key, compensations)
    slots, written = _momentum_run_slots(params, grads, momentum_buffers, momentum, rounding)

    def body(t: _Tables) -> None:
        _sgd_launch(t, config, None, rounding, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    nesterov=nesterov, grad_sign=-1.0 if maximize else 1.0, grad_scale=grad_scale, found_inf=found_inf)

    _run(slots, (*written, *_unscaled(grad_scale)), body, config.block, extra=new_buffer if momentum != 0 else None)


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step_sizes, bias_correction2_sqrts, lr, beta1, beta2,
    eps, weight_decay, amsgrad, maximize, rounding=None, state_steps=None, grad_scale=None, found_inf=None,
):
    """AdamW's launch. Host scalars: ``step_sizes`` and ``bias_correction2_sqrts`` per tensor. Capturable:
    ``state_steps`` (each parameter's counted fp32 step, on the device; the scalar lists None), from which the
    kernel computes them, with ``lr`` a float or a tensor on the device."""
    if not params:
        return
    dispatch("triton_adamw_", _adamw_launches, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
             max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else [], step_sizes=per_tensor(step_sizes),
             bias_correction2_sqrts=per_tensor(bias_correction2_sqrts), state_steps=state_steps or [], lr=lr,
             beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
             **_rounding_call_args(rounding), grad_scale=grad_scale, found_inf=found_inf)


def _adamw_launches(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step_sizes, bias_correction2_sqrts,
                    state_steps, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, rounding_mode, rounding_key,
                    compensations, grad_scale, found_inf):
    config = launch_config(params[0].device)
    rounding = _rounding_of(rounding_mode, rounding_key, compensations)
    capturable = bool(state_steps)
    lr_ptr = lr if isinstance(lr, torch.Tensor) else None
    if capturable:
        scalars = dict(decay=0.0, step_size=0.0, bias_correction2_sqrt=1.0,
                       lr=0.0 if lr_ptr is not None else float(lr), weight_decay=float(weight_decay),
                       log2_beta1=_log2(beta1), log2_beta2=_log2(beta2))
    else:
        scalars = dict(decay=1.0 - lr * weight_decay, lr=0.0, weight_decay=0.0, log2_beta1=0.0, log2_beta2=0.0)
    slots = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        slots["max_exp_avg_sqs"] = max_exp_avg_sqs
    slots.update(compensation_slot(rounding))

    def body(t: _Tables) -> None:
        corrections = {} if capturable else dict(zip(("step_size", "bias_correction2_sqrt"), t.extra))
        _launch(
            K.adamw_kernel, t.blocks.num_blocks, _warps(config, t, stores_fp32_state=True),
            param_ptrs=t.slot["params"], grad_ptrs=t.slot["grads"], exp_avg_ptrs=t.slot["exp_avgs"],
            exp_avg_sq_ptrs=t.slot["exp_avg_sqs"], max_exp_avg_sq_ptrs=t.slot.get("max_exp_avg_sqs"),
            **t.blocks.geometry(), step_ptrs=t.slot.get("steps"), lr_ptr=lr_ptr, grad_scale=grad_scale,
            found_inf=found_inf, beta1=beta1, beta2=beta2, eps=eps, **{**scalars, **corrections},
            grad_sign=-1.0 if maximize else 1.0,
            P_DTYPE=t.dtype["params"], G_DTYPE=t.dtype["grads"], AMSGRAD=amsgrad, **_rounding_args(t, rounding),
        )

    written = [n for n in slots if n != "grads"] + list(_unscaled(grad_scale))
    if capturable:
        _run(slots, written, body, config.block, side={"steps": state_steps})
    else:
        _run(slots, written, body, config.block, extra=list(zip(step_sizes, bias_correction2_sqrts)))


def _tensor_sums(t: _Tables, block_sums: torch.Tensor, num_warps: int) -> torch.Tensor:
    """Per-tensor sums of two rows of per-block sums: one launch, each tensor's blocks in order."""
    sums = t.blocks.scratch("tensor_sums", (2, t.blocks.num_tensors))
    _launch(
        K.tensor_sums_kernel, _reduction_grid(t.blocks.num_tensors), num_warps,
        a_block_sums=block_sums[0], b_block_sums=block_sums[1], first_block=t.blocks.first_block,
        block_count=t.blocks.block_count, num_tensors=t.blocks.num_tensors, a_sums=sums[0], b_sums=sums[1],
        TWO=True, RBLOCK=RBLOCK,
    )
    return sums


def lars(
    params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps,
    trust_clip, always_adapt, rounding=None, grad_scale=None, found_inf=None,
):
    if not params:
        return
    slots, _, new = momentum_slots(params, grads, momentum_buffers, momentum)
    dispatch("triton_lars_", _lars_launches, params=params, grads=grads,
             momentum_buffers=slots.get("momentum_buffers", []), new_buffer=new or [], lr=lr, momentum=momentum,
             dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, trust_coeff=trust_coeff, eps=eps,
             trust_clip=trust_clip, adapt=weight_decay != 0 or always_adapt, **_rounding_call_args(rounding),
             grad_scale=grad_scale, found_inf=found_inf)


def _lars_launches(params, grads, momentum_buffers, new_buffer, *, lr, momentum, dampening, weight_decay, nesterov,
                   trust_coeff, eps, trust_clip, adapt, rounding_mode, rounding_key, compensations, grad_scale,
                   found_inf):
    config = launch_config(params[0].device)
    rounding = _rounding_of(rounding_mode, rounding_key, compensations)
    slots, written = _momentum_run_slots(params, grads, momentum_buffers, momentum, rounding)

    def body(t: _Tables) -> None:
        sums = None
        if adapt:
            block_sums = t.blocks.scratch("block_sums", (2, t.blocks.num_blocks))
            kahan = _rounding_args(t, rounding)["ROUNDING"] == 2
            _launch(
                K.block_sumsq_kernel, _reduction_grid(t.blocks.num_blocks), config.num_warps,
                a_ptrs=t.slot["params"], b_ptrs=t.slot["grads"],
                a_compensation_ptrs=t.slot["compensations"] if kahan else None,
                **t.blocks.geometry(), num_blocks=t.blocks.num_blocks, a_sums=block_sums[0], b_sums=block_sums[1],
                b_scale=grad_scale, A_DTYPE=t.dtype["params"], B_DTYPE=t.dtype["grads"], TWO=True, A_KAHAN=kahan,
            )
            sums = _tensor_sums(t, block_sums, config.num_warps)
        _sgd_launch(t, config, sums, rounding, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, grad_scale=grad_scale,
                    found_inf=found_inf)

    _run(slots, (*written, *_unscaled(grad_scale)), body, config.block, extra=new_buffer if momentum != 0 else None)


@dataclass
class _Clip:
    """LAMB's global clipping: the sum of squares of all gradients, on the device (no host sync)."""

    sumsq: torch.Tensor
    max_grad_norm: float


def lamb_clip(grads: list[torch.Tensor], max_grad_norm: float | None) -> _Clip | None:
    """The sum of squares of all gradients, reduced once: one launch per gradient dtype, no host sync."""
    if max_grad_norm is None or not grads:
        return None
    return _Clip(dispatch("triton_lamb_sumsq", _lamb_sumsq, grads=grads), float(max_grad_norm))


def _lamb_sumsq(grads: list[torch.Tensor]) -> torch.Tensor:
    config = launch_config(grads[0].device)
    total = torch.zeros(1, device=grads[0].device)  # stays 0 when every gradient is empty
    launched = []

    def body(t: _Tables) -> None:
        num_chunks = (t.blocks.num_blocks + CLIP_CHUNK - 1) // CLIP_CHUNK
        if not num_chunks:
            return
        _launch(
            K.clip_kernel, _reduction_grid(num_chunks), config.num_warps,
            grad_ptrs=t.slot["grads"], **t.blocks.geometry(), num_blocks=t.blocks.num_blocks,
            chunk_sums=t.blocks.scratch("clip_chunk_sums", (num_chunks,)), num_chunks=num_chunks,
            # created zero; the last program of each launch sets it back to zero
            counter=t.blocks.scratch("clip_counter", (1,), torch.int32),
            total=total, G_DTYPE=t.dtype["grads"], ACCUMULATE=bool(launched), CHUNK=CLIP_CHUNK, RBLOCK=RBLOCK,
        )
        launched.append(t)

    _run({"grads": grads}, (), body, config.block)
    return total


def lamb(
    params, grads, exp_avgs, exp_avg_sqs, *, clip, lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
    weight_decay, decoupled_decay_factor, adapt, trust_clip, caution, rounding=None, state_step=None,
    grad_scale=None, found_inf=None,
):
    """LAMB's launches. Capturable: ``state_step`` (the group's counted fp32 step, on the device; the bias
    corrections None), from which the kernels compute them."""
    if caution:
        raise AssertionError("dispatch routes caution=True to the reference backend")
    if not params:
        return
    dispatch("triton_lamb_", _lamb_launches, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
             clip_sumsq=None if clip is None else clip.sumsq, max_grad_norm=1.0 if clip is None else clip.max_grad_norm,
             lr=lr, beta1=beta1, beta2=beta2, beta3=beta3,
             bias_correction1=1.0 if bias_correction1 is None else bias_correction1,
             bias_correction2=1.0 if bias_correction2 is None else bias_correction2, eps=eps, weight_decay=weight_decay,
             decay=1.0 - decoupled_decay_factor, adapt=adapt, trust_clip=trust_clip, **_rounding_call_args(rounding),
             state_step=state_step, grad_scale=grad_scale, found_inf=found_inf)


def _lamb_launches(params, grads, exp_avgs, exp_avg_sqs, *, clip_sumsq, max_grad_norm, lr, beta1, beta2, beta3,
                   bias_correction1, bias_correction2, eps, weight_decay, decay, adapt, trust_clip, rounding_mode,
                   rounding_key, compensations, state_step, grad_scale, found_inf):
    config = launch_config(params[0].device)
    rounding = _rounding_of(rounding_mode, rounding_key, compensations)
    slots = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             **compensation_slot(rounding)}
    # the square root taken here, on the host's double, in eager and compiled steps alike (Inductor's sqrt of a
    # float64 tensor differed from Python's ** 0.5 in the last bit, and so some updates after fp32 narrowing)
    update = dict(bias_correction1=bias_correction1, bias_correction2_sqrt=bias_correction2**0.5, eps=eps,
                  weight_decay=weight_decay, decay=decay)
    loop = dict(step_ptr=state_step, found_inf=found_inf, log2_beta1=_log2(beta1), log2_beta2=_log2(beta2))

    def body(t: _Tables) -> None:
        block_sums = t.blocks.scratch("block_sums", (2, t.blocks.num_blocks)) if adapt else None
        rounding_args = _rounding_args(t, rounding)
        reads_kahan = rounding_args["ROUNDING"] == 2 and adapt  # moments read the weight only for the ratio
        _launch(
            K.lamb_moments_kernel, t.blocks.num_blocks, _warps(config, t, stores_fp32_state=True),
            param_ptrs=t.slot["params"], grad_ptrs=t.slot["grads"], exp_avg_ptrs=t.slot["exp_avgs"],
            exp_avg_sq_ptrs=t.slot["exp_avg_sqs"],
            compensation_ptrs=rounding_args["compensation_ptrs"] if reads_kahan else None,
            **t.blocks.geometry(), clip_sumsq=clip_sumsq, max_grad_norm=max_grad_norm, grad_scale=grad_scale, **loop,
            param_block_sums=None if block_sums is None else block_sums[0],
            update_block_sums=None if block_sums is None else block_sums[1],
            beta1=beta1, beta2=beta2, beta3=beta3, **update,
            P_DTYPE=t.dtype["params"], G_DTYPE=t.dtype["grads"], HAS_CLIP=clip_sumsq is not None,
            AVERAGING=beta3 == 1 - beta1, ADAPT=adapt, ROUNDING=2 if reads_kahan else 0,
        )
        sums = _tensor_sums(t, block_sums, config.num_warps) if adapt else None
        _launch(
            K.lamb_apply_kernel, t.blocks.num_blocks, config.num_warps,
            param_ptrs=t.slot["params"], exp_avg_ptrs=t.slot["exp_avgs"], exp_avg_sq_ptrs=t.slot["exp_avg_sqs"],
            **t.blocks.geometry(), param_sumsq=None if sums is None else sums[0],
            update_sumsq=None if sums is None else sums[1], lr=lr, **update, **loop,
            P_DTYPE=t.dtype["params"], ADAPT=adapt, TRUST_CLIP=trust_clip, **rounding_args,
        )

    _run(slots, ("params", "exp_avgs", "exp_avg_sqs", "compensations", *_unscaled(grad_scale)), body, config.block)


def _log2(beta: float) -> float:
    """log2 of a beta in [0, 1), the kernels' form of it for beta^step on the device (-inf for 0: 0^step = 0)."""
    return math.log2(beta) if beta > 0 else -math.inf


# -- the custom ops (see fused_ft.kernels._ops; locals() at an op's first line is its arguments) ---------------
# ``mutates_args`` names exactly the lists each op's kernels write (torch.library.opcheck checks it in the tests);
# the gradients are written where GradScaler's grad_scale is given (stored unscaled).
_MOMENTUM_WRITES = ("params", "grads", "momentum_buffers", "compensations")


@torch.library.custom_op("fused_ft::triton_sgd_", mutates_args=_MOMENTUM_WRITES)
def _sgd_op(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], new_buffer: list[bool],
            lr: Tensor, momentum: Tensor, dampening: Tensor, weight_decay: Tensor, nesterov: bool, maximize: bool,
            rounding_mode: int, rounding_key: int, compensations: list[Tensor], grad_scale: Optional[Tensor],
            found_inf: Optional[Tensor]) -> None:
    _sgd_launches(**host(locals()))


@torch.library.custom_op("fused_ft::triton_adamw_", mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs",
                                                                   "max_exp_avg_sqs", "compensations"))
def _adamw_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              max_exp_avg_sqs: list[Tensor], step_sizes: Optional[Tensor], bias_correction2_sqrts: Optional[Tensor],
              state_steps: list[Tensor], lr: Tensor, beta1: Tensor, beta2: Tensor, eps: Tensor, weight_decay: Tensor,
              amsgrad: bool, maximize: bool, rounding_mode: int, rounding_key: int, compensations: list[Tensor],
              grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    args = host({k: v for k, v in locals().items() if k != "lr"})
    # a capturable step reads a tensor lr on the device, where it is
    device_lr = state_steps and lr.device == params[0].device
    _adamw_launches(**args, lr=lr if device_lr else lr.item())


@torch.library.custom_op("fused_ft::triton_lars_", mutates_args=_MOMENTUM_WRITES)
def _lars_op(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], new_buffer: list[bool],
             lr: Tensor, momentum: Tensor, dampening: Tensor, weight_decay: Tensor, nesterov: bool,
             trust_coeff: Tensor, eps: Tensor, trust_clip: bool, adapt: bool, rounding_mode: int, rounding_key: int,
             compensations: list[Tensor], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    _lars_launches(**host(locals()))


@torch.library.custom_op("fused_ft::triton_lamb_sumsq", mutates_args=())
def _lamb_sumsq_op(grads: list[Tensor]) -> Tensor:
    return _lamb_sumsq(grads)


@torch.library.custom_op("fused_ft::triton_lamb_", mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs",
                                                                  "compensations"))
def _lamb_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
             clip_sumsq: Optional[Tensor], max_grad_norm: Tensor, lr: Tensor, beta1: Tensor, beta2: Tensor,
             beta3: Tensor, bias_correction1: Tensor, bias_correction2: Tensor, eps: Tensor, weight_decay: Tensor,
             decay: Tensor, adapt: bool, trust_clip: bool, rounding_mode: int, rounding_key: int,
             compensations: list[Tensor], state_step: Optional[Tensor], grad_scale: Optional[Tensor],
             found_inf: Optional[Tensor]) -> None:
    _lamb_launches(**host(locals()))


for _op in (_sgd_op, _adamw_op, _lars_op, _lamb_op):
    _op.register_fake(lambda *args, **kwargs: None)  # they only write their arguments in place


@_lamb_sumsq_op.register_fake
def _(grads):
    return grads[0].new_empty((1,), dtype=torch.float32)


# The updates whose kernels take GradScaler's grad_scale and found_inf (see fused_ft.optim._dispatch): AdamW's and
# LAMB's where their step counts live on the device (see each optimizer's _scaler_in_kernel).
SCALER_IN_KERNEL = frozenset({"sgd", "adamw", "lars", "lamb"})

# The backend contract (see fused_ft.optim._dispatch): update name -> function.
UPDATES = {"sgd": sgd, "adamw": adamw, "lars": lars, "lamb": lamb, "lamb_clip": lamb_clip}
adamw.capturable = lamb.capturable = True  # compute the bias corrections from step counts on the device
