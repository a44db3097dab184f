"""Triton kernels for the five updates; launchers live in ``triton_launch``.

Multi-tensor layout: one launch covers every tensor of a dtype combination. Each tensor slot
(``param_ptrs``, ``grad_ptrs``, the state slots) is an int64 table of data addresses, one per tensor;
the block table maps program ``pid`` to a tensor (``block_tensor``) and its first element there
(``block_start``).

Argument names say what they hold (``*_ptrs``: an address table), and none is a name that Triton's
generated binder uses itself: its locals ``params``, ``specialization`` and ``options`` and its
globals shadow a kernel argument of the same name, and every launch then fails before it runs
(``TypeError: failed to specialize argument of type: dict``, seen on an H200 with an argument named
``params``). ``tests/test_launch_path.py`` checks the names against the binder and drives every launch
through Triton's launch path.

Full blocks take an unmasked path. A program whose block lies wholly inside its tensor
(``start + BLOCK <= numel``) loads and stores without a mask; only each tensor's last, partial block
takes the masked path. Together with the hints below this is what lets the compiler emit 128-bit
loads and stores (``ld.global.v4``): a mask built from a ``numel`` loaded at run time cannot be
proven constant over a vector, so a kernel masked everywhere gets 32-bit accesses only. The hints
are true by construction: the launcher sends every tensor whose address is not 16-byte aligned
through an aligned copy, and every ``block_start`` is a multiple of BLOCK.

All math is fp32: values are loaded in their storage dtype, converted, and the parameter is stored
once in its own dtype. Per-step hyperparameters are float arguments, which Triton never
specializes on, so a changing learning rate or bias correction never recompiles.

Norms (LARS, LAMB) are reduced once, in a fixed order that does not depend on how many programs
run: a sum of squares per block, then per tensor (``tensor_sums_kernel`` walks each tensor's block
sums in order), so an update program reads O(1) norm values. LAMB's global gradient norm is summed
once per step by whichever program of ``clip_kernel`` finishes last (the classic last-block
reduction: an atomic counter says who is last, no atomic touches a value).
"""
import triton
import triton.language as tl


@triton.jit
def _slot(table, t, DTYPE: tl.constexpr):
    """Tensor ``t``'s data pointer from a slot's address table (16-byte aligned: see the module doc)."""
    return tl.multiple_of(tl.load(table + t).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _block_of(index, block_tensor, block_start, numels, BLOCK: tl.constexpr):
    """Block ``index`` of the table: its tensor, first element, the tensor's size, element offsets."""
    t = tl.load(block_tensor + index)
    start = tl.multiple_of(tl.load(block_start + index), BLOCK)
    return t, start, tl.load(numels + t), start + tl.arange(0, BLOCK)


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32 (fused_ft/_precision.py: the same integers in every backend)."""
    x ^= x >> 16
    x *= tl.full((), 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _tensor_key(rounding_key, t):
    """The stochastic-rounding key of tensor ``t`` of the launch (``rounding_key``: int32 bits of a uint32)."""
    key = rounding_key.to(tl.uint32, bitcast=True)
    return _mix32(key + t.to(tl.uint32) * tl.full((), 0x9E3779B9, tl.uint32))


@triton.jit
def _load_param(ptr, comp_ptr, mask, ROUNDING: tl.constexpr):
    """A parameter as fp32; under kahan (ROUNDING 2, bf16 only) merged with its int16 compensation,
    which holds the 16 low bits its last rounding dropped: the exact fp32 value."""
    if ROUNDING == 2:
        high = tl.load(ptr, mask=mask).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        low = tl.load(comp_ptr, mask=mask).to(tl.int32).to(tl.uint32, bitcast=True)
        return (high + low).to(tl.float32, bitcast=True)
    return tl.load(ptr, mask=mask).to(tl.float32)


@triton.jit
def _store_param(ptr, x, mask, DTYPE: tl.constexpr, ROUNDING: tl.constexpr = 0, comp_ptr=None, key=None,
                 offs=None):
    """Store fp32 ``x`` in the parameter's dtype. ROUNDING (bf16 only): 0 to nearest-even, 1
    stochastically (16 random bits of ``mix32(offs * golden + key)`` added below bf16's last
    mantissa bit, then truncated), 2 kahan (rounded half away from zero, the dropped low 16 bits
    stored as int16 at ``comp_ptr``).

    Nearest-even uses integer arithmetic: Triton's CPU interpreter (3.8) truncates fp32 to bf16
    even with fp_downcast_rounding="rtne", which walks every bf16 parameter towards zero. The bit
    trick is exact round-to-nearest-even on GPUs too, so both paths agree with torch.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        if ROUNDING == 1:
            random = _mix32(offs.to(tl.uint32) * tl.full((), 0x9E3779B9, tl.uint32) + key)
            bits = bits + (random & 0xFFFF)
        elif ROUNDING == 2:
            bits = bits + 0x8000
            comp = ((bits & 0xFFFF).to(tl.int32) - 0x8000).to(tl.int16)
            tl.store(comp_ptr, tl.where(x != x, 0, comp).to(tl.int16), mask=mask)
        else:
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(ptr, tl.where(x != x, x.to(tl.bfloat16), rounded), mask=mask)  # NaN stays NaN
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)


@triton.jit
def _momentum(d, buf_ptr, mask, buf_keep, buf_scale, momentum, NESTEROV: tl.constexpr):
    """torch's momentum: b = keep*b + scale*d (a new, zeroed buffer has keep=0, scale=1: b = d)."""
    buf = buf_keep * tl.load(buf_ptr, mask=mask) + buf_scale * d
    tl.store(buf_ptr, buf, mask=mask)
    if NESTEROV:
        return d + momentum * buf
    return buf


@triton.jit
def _load_grad(g_ptr, mask, grad_scale, G_DTYPE: tl.constexpr):
    """A gradient as fp32; with GradScaler's ``grad_scale`` (1-element fp32, None without one) divided by it
    as it loads and the unscaled gradient stored back, as torch's fused kernels do (``p.grad`` after the step
    is what ``GradScaler.unscale_`` would have left). Its ``found_inf`` (1-element fp32, None without one) is
    read by each kernel first: set, the program returns, and the update (parameters, state, gradients) is
    skipped on the device as torch's fused kernels skip it, with no host sync."""
    g = tl.load(g_ptr, mask=mask).to(tl.float32)
    if grad_scale is not None:
        g = g / tl.load(grad_scale)
        tl.store(g_ptr, g.to(G_DTYPE), mask=mask)
    return g


@triton.jit
def _ordered_sum(values, first, end, RBLOCK: tl.constexpr):
    """Sum of ``values[first:end]`` in a fixed order (RBLOCK lanes, then a tree): deterministic."""
    acc = tl.zeros((RBLOCK,), dtype=tl.float32)
    for i in range(first, end, RBLOCK):
        idx = i + tl.arange(0, RBLOCK)
        acc += tl.load(values + idx, mask=idx < end, other=0.0)
    return tl.sum(acc, axis=0)


# -- SGD and LARS ----------------------------------------------------------------------------------
@triton.jit
def _sgd_block(p_ptr, g_ptr, buf_ptr, c_ptr, key, offs, mask, ratio, lr, weight_decay, grad_sign, buf_keep,
               buf_scale, momentum, grad_scale, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, ADAPT: tl.constexpr, ROUNDING: tl.constexpr):
    w = _load_param(p_ptr, c_ptr, mask, ROUNDING)
    d = _load_grad(g_ptr, mask, grad_scale, G_DTYPE) * grad_sign + weight_decay * w
    if ADAPT:
        d = d * ratio
    if HAS_MOMENTUM:
        d = _momentum(d, buf_ptr, mask, buf_keep, buf_scale, momentum, NESTEROV)
    _store_param(p_ptr, w - lr * d, mask, P_DTYPE, ROUNDING, c_ptr, key, offs)


# The rounding key changes every step: specializing on it would compile new variants as it goes.
@triton.jit(do_not_specialize=["rounding_key"])
def sgd_kernel(
    param_ptrs, grad_ptrs, momentum_buffer_ptrs, compensation_ptrs, numels, block_tensor, block_start, param_sumsq,
    grad_sumsq, grad_scale, found_inf,
    lr, weight_decay, grad_sign, buf_keep, buf_scale, momentum, trust_coeff, eps, rounding_key,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):
    """SGD, and LARS as SGD with a trust ratio (ADAPT) from per-tensor sums of squares
    (``param_sumsq``, ``grad_sumsq``: None without ADAPT). ``momentum_buffer_ptrs`` are fp32 (None
    without momentum); ``compensation_ptrs`` int16 (kahan only, see ``_store_param``); ``grad_scale`` and
    ``found_inf``: GradScaler's (see ``_load_grad``), None without one."""
    if found_inf is not None:  # GradScaler found an inf or NaN: the whole update is skipped (see _load_grad)
        if tl.load(found_inf) != 0:
            return
    t, start, numel, offs = _block_of(tl.program_id(0), block_tensor, block_start, numels, BLOCK)
    p_ptr = _slot(param_ptrs, t, P_DTYPE) + offs
    g_ptr = _slot(grad_ptrs, t, G_DTYPE) + offs
    buf_ptr = None
    if HAS_MOMENTUM:
        buf_ptr = _slot(momentum_buffer_ptrs, t, tl.float32) + offs
    c_ptr = None
    if ROUNDING == 2:
        c_ptr = _slot(compensation_ptrs, t, tl.int16) + offs
    key = None
    if ROUNDING == 1:
        key = _tensor_key(rounding_key, t)
    ratio = 1.0
    if ADAPT:
        w_norm = tl.sqrt(tl.load(param_sumsq + t))
        g_norm = tl.sqrt(tl.load(grad_sumsq + t))
        ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)  # eps > 0 or g_norm > 0 below
        ratio = tl.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
        if TRUST_CLIP:
            ratio = tl.minimum(ratio / lr, 1.0)
    if start + BLOCK <= numel:
        _sgd_block(p_ptr, g_ptr, buf_ptr, c_ptr, key, offs, None, ratio, lr, weight_decay, grad_sign, buf_keep,
                   buf_scale, momentum, grad_scale, P_DTYPE, G_DTYPE, HAS_MOMENTUM, NESTEROV, ADAPT, ROUNDING)
    else:
        _sgd_block(p_ptr, g_ptr, buf_ptr, c_ptr, key, offs, offs < numel, ratio, lr, weight_decay, grad_sign,
                   buf_keep, buf_scale, momentum, grad_scale, P_DTYPE, G_DTYPE, HAS_MOMENTUM, NESTEROV, ADAPT,
                   ROUNDING)


# -- AdamW -----------------------------------------------------------------------------------------
@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, key, offs, mask, decay, beta1, beta2, eps, step_size,
                 bias_correction2_sqrt, grad_sign, grad_scale, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                 AMSGRAD: tl.constexpr, ROUNDING: tl.constexpr):
    w = _load_param(p_ptr, c_ptr, mask, ROUNDING) * decay
    d = _load_grad(g_ptr, mask, grad_scale, G_DTYPE) * grad_sign
    m = tl.load(m_ptr, mask=mask)
    m = m + (1.0 - beta1) * (d - m)  # torch's lerp
    v = beta2 * tl.load(v_ptr, mask=mask) + (1.0 - beta2) * d * d
    tl.store(m_ptr, m, mask=mask)
    tl.store(v_ptr, v, mask=mask)
    if AMSGRAD:
        v = tl.maximum(tl.load(vmax_ptr, mask=mask), v)
        tl.store(vmax_ptr, v, mask=mask)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    _store_param(p_ptr, w - step_size * (m / denom), mask, P_DTYPE, ROUNDING, c_ptr, key, offs)


@triton.jit
def _bias_corrections(step, log2_beta1, log2_beta2):
    """``1 - beta1^step`` and ``sqrt(1 - beta2^step)`` in fp64 from a step count on the device (fp64 ``log2(beta)``
    arguments): the host path's doubles, narrowed to fp32 by the caller where the host's are passed in."""
    bias_correction1 = 1.0 - tl.exp2(step * tl.full((), log2_beta1, tl.float64))
    return bias_correction1, tl.sqrt(1.0 - tl.exp2(step * tl.full((), log2_beta2, tl.float64)))


@triton.jit
def _adamw_corrections(step_ptrs, t, lr, log2_beta1, log2_beta2):
    """``lr / (1 - beta1^step)`` and ``sqrt(1 - beta2^step)`` of tensor ``t`` from its step count on the device
    (capturable: no host value changes from step to step), in fp64 from the fp64 ``lr`` and ``log2(beta)``, then
    narrowed to fp32 as the host's doubles are when passed in: the same fp32 values as the host path's
    (``fused_ft.optim.adamw``) but where the two doubles straddle an fp32 rounding boundary (exp2 and C's pow
    differ in the last bits of a double)."""
    step = tl.load(tl.load(step_ptrs + t).to(tl.pointer_type(tl.float32))).to(tl.float64)  # (no alignment hint)
    bias_correction1, bias_correction2_sqrt = _bias_corrections(step, log2_beta1, log2_beta2)
    return (lr / bias_correction1).to(tl.float32), bias_correction2_sqrt.to(tl.float32)


@triton.jit(do_not_specialize=["rounding_key"])
def adamw_kernel(
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_exp_avg_sq_ptrs, compensation_ptrs, numels, block_tensor,
    block_start, step_ptrs, lr_ptr, grad_scale, found_inf,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, grad_sign, rounding_key,
    lr: tl.float64, weight_decay: tl.float64, log2_beta1: tl.float64, log2_beta2: tl.float64,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, ROUNDING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """AdamW; the state slots are fp32 (``max_exp_avg_sq_ptrs`` None without amsgrad).

    Host scalars (``step_ptrs`` None): ``decay`` = 1 - lr*weight_decay, ``step_size`` = lr / (1 - beta1^t),
    ``bias_correction2_sqrt``. Capturable (``step_ptrs``: each tensor's fp32 step count, already counted): the
    kernel computes them from the counts, from ``lr`` or, where the learning rate is a tensor on the device,
    from ``lr_ptr``. ``grad_scale`` and ``found_inf``: GradScaler's (see ``_load_grad``).
    """
    if found_inf is not None:  # GradScaler found an inf or NaN: the whole update is skipped (see _load_grad)
        if tl.load(found_inf) != 0:
            return
    t, start, numel, offs = _block_of(tl.program_id(0), block_tensor, block_start, numels, BLOCK)
    if step_ptrs is not None:
        lr64 = tl.full((), lr, tl.float64)  # (the interpreter passes the fp64 arguments as Python floats)
        if lr_ptr is not None:
            lr64 = tl.load(lr_ptr).to(tl.float64)
        decay = (1.0 - lr64 * tl.full((), weight_decay, tl.float64)).to(tl.float32)
        step_size, bias_correction2_sqrt = _adamw_corrections(step_ptrs, t, lr64, log2_beta1, log2_beta2)
    p_ptr = _slot(param_ptrs, t, P_DTYPE) + offs
    g_ptr = _slot(grad_ptrs, t, G_DTYPE) + offs
    m_ptr = _slot(exp_avg_ptrs, t, tl.float32) + offs
    v_ptr = _slot(exp_avg_sq_ptrs, t, tl.float32) + offs
    vmax_ptr = None
    if AMSGRAD:
        vmax_ptr = _slot(max_exp_avg_sq_ptrs, t, tl.float32) + offs
    c_ptr = None
    if ROUNDING == 2:
        c_ptr = _slot(compensation_ptrs, t, tl.int16) + offs
    key = None
    if ROUNDING == 1:
        key = _tensor_key(rounding_key, t)
    if start + BLOCK <= numel:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, key, offs, None, decay, beta1, beta2, eps,
                     step_size, bias_correction2_sqrt, grad_sign, grad_scale, P_DTYPE, G_DTYPE, AMSGRAD, ROUNDING)
    else:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, key, offs, offs < numel, decay, beta1, beta2, eps,
                     step_size, bias_correction2_sqrt, grad_sign, grad_scale, P_DTYPE, G_DTYPE, AMSGRAD, ROUNDING)


# -- norms -----------------------------------------------------------------------------------------
@triton.jit
def _sumsq_block(a_ptr, b_ptr, mask, other, TWO: tl.constexpr, a_comp_ptr=None, A_KAHAN: tl.constexpr = False,
                 b_scale=None):
    if A_KAHAN:
        x = _load_param(a_ptr, a_comp_ptr, mask, 2)
        if mask is not None:
            x = tl.where(mask, x, 0.0)
    else:
        x = tl.load(a_ptr, mask=mask, other=other).to(tl.float32)
    sum_b = 0.0
    if TWO:
        y = tl.load(b_ptr, mask=mask, other=other).to(tl.float32)
        if b_scale is not None:  # GradScaler's: the norm of the unscaled gradient, as the update uses it
            y = y / tl.load(b_scale)
        sum_b = tl.sum(y * y, axis=0)
    return tl.sum(x * x, axis=0), sum_b


# Counts are loop bounds only: specializing on their divisibility by 16 would compile a variant per
# model for nothing.
@triton.jit(do_not_specialize=["num_blocks"])
def block_sumsq_kernel(
    a_ptrs, b_ptrs, a_compensation_ptrs, numels, block_tensor, block_start, num_blocks, a_sums, b_sums, b_scale,
    A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, TWO: tl.constexpr, A_KAHAN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sum of squares of every block of the tensors of address table ``a_ptrs`` (and ``b_ptrs`` when TWO, divided
    by ``b_scale[0]`` where given: GradScaler's scale of the gradients), stored per block; with A_KAHAN,
    ``a_ptrs`` holds bf16 parameters merged with their ``a_compensation_ptrs``.

    Grid-strides over the blocks, so any number of programs gives the same bits.
    """
    for blk in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
        t, start, numel, offs = _block_of(blk, block_tensor, block_start, numels, BLOCK)
        a_ptr = _slot(a_ptrs, t, A_DTYPE) + offs
        b_ptr = None
        if TWO:
            b_ptr = _slot(b_ptrs, t, B_DTYPE) + offs
        c_ptr = None
        if A_KAHAN:
            c_ptr = _slot(a_compensation_ptrs, t, tl.int16) + offs
        if start + BLOCK <= numel:
            sum_a, sum_b = _sumsq_block(a_ptr, b_ptr, None, None, TWO, c_ptr, A_KAHAN, b_scale)
        else:
            sum_a, sum_b = _sumsq_block(a_ptr, b_ptr, offs < numel, 0.0, TWO, c_ptr, A_KAHAN, b_scale)
        tl.store(a_sums + blk, sum_a)
        if TWO:
            tl.store(b_sums + blk, sum_b)


@triton.jit(do_not_specialize=["num_tensors"])
def tensor_sums_kernel(
    a_block_sums, b_block_sums, first_block, block_count, num_tensors, a_sums, b_sums,
    TWO: tl.constexpr, RBLOCK: tl.constexpr,
):
    """Per-tensor sums of the per-block sums, each tensor's blocks in order (one tensor a program)."""
    for t in range(tl.program_id(0), num_tensors, tl.num_programs(0)):
        first = tl.load(first_block + t)
        end = first + tl.load(block_count + t)
        tl.store(a_sums + t, _ordered_sum(a_block_sums, first, end, RBLOCK))
        if TWO:
            tl.store(b_sums + t, _ordered_sum(b_block_sums, first, end, RBLOCK))


@triton.jit(do_not_specialize=["num_blocks", "num_chunks"])
def clip_kernel(
    grad_ptrs, numels, block_tensor, block_start, num_blocks, chunk_sums, num_chunks, counter, total,
    G_DTYPE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    """Sum of squares of all gradients into ``total[0]`` (added to it when ACCUMULATE).

    Each chunk of CHUNK consecutive blocks has a fixed partial sum (its block sums added in order);
    the last program to finish sums the chunks in order and resets the counter for the next step.
    Grid-strides over the chunks, so any number of programs gives the same bits.
    """
    for c in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
        acc = 0.0
        for blk in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, num_blocks)):
            t, start, numel, offs = _block_of(blk, block_tensor, block_start, numels, BLOCK)
            g_ptr = _slot(grad_ptrs, t, G_DTYPE) + offs
            if start + BLOCK <= numel:
                block_sum, _ = _sumsq_block(g_ptr, None, None, None, False)
            else:
                block_sum, _ = _sumsq_block(g_ptr, None, offs < numel, 0.0, False)
            acc += block_sum
        tl.store(chunk_sums + c, acc)
    # acq_rel: this program's chunk sums are visible to whoever sees the counter's last value
    if tl.atomic_add(counter, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        s = _ordered_sum(chunk_sums, 0, num_chunks, RBLOCK)
        if ACCUMULATE:
            s += tl.load(total)
        tl.store(total, s)
        tl.store(counter, 0)


# -- LAMB ------------------------------------------------------------------------------------------
@triton.jit
def _lamb_update(m, v, w, bias_correction1, bias_correction2_sqrt, eps, weight_decay):
    return (m / bias_correction1) / (tl.sqrt(v) / bias_correction2_sqrt + eps) + weight_decay * w


@triton.jit
def _lamb_moments_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, mask, other, clip, beta1, beta2, beta3, bias_correction1,
                        bias_correction2_sqrt, eps, weight_decay, decay, grad_scale, G_DTYPE: tl.constexpr,
                        AVERAGING: tl.constexpr, ADAPT: tl.constexpr, ROUNDING: tl.constexpr):
    if grad_scale is not None:
        d = _load_grad(g_ptr, mask, grad_scale, G_DTYPE) / clip
    else:  # (the masked-off lanes read ``other``: the reductions below sum them)
        d = tl.load(g_ptr, mask=mask, other=other).to(tl.float32) / clip
    m = tl.load(m_ptr, mask=mask, other=other)
    if AVERAGING:
        m = m + beta3 * (d - m)  # torch's lerp, as timm uses when beta3 == 1 - beta1
    else:
        m = beta1 * m + beta3 * d
    v = beta2 * tl.load(v_ptr, mask=mask, other=other) + (1.0 - beta2) * d * d
    tl.store(m_ptr, m, mask=mask)
    tl.store(v_ptr, v, mask=mask)
    sum_w = 0.0
    sum_u = 0.0
    if ADAPT:
        w = _load_param(p_ptr, c_ptr, mask, ROUNDING) * decay
        u = _lamb_update(m, v, w, bias_correction1, bias_correction2_sqrt, eps, weight_decay)
        if mask is not None:
            w = tl.where(mask, w, 0.0)
            u = tl.where(mask, u, 0.0)
        sum_w = tl.sum(w * w, axis=0)
        sum_u = tl.sum(u * u, axis=0)
    return sum_w, sum_u


@triton.jit
def _lamb_scalars(step_ptr, bias_correction1, bias_correction2_sqrt, log2_beta1, log2_beta2):
    """The bias corrections: the host's (``step_ptr`` None), or from the group's step count on the device."""
    if step_ptr is not None:
        bc1, bc2_sqrt = _bias_corrections(tl.load(step_ptr).to(tl.float64), log2_beta1, log2_beta2)
        bias_correction1 = bc1.to(tl.float32)
        bias_correction2_sqrt = bc2_sqrt.to(tl.float32)
    return bias_correction1, bias_correction2_sqrt


@triton.jit
def lamb_moments_kernel(
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, compensation_ptrs, numels, block_tensor, block_start,
    clip_sumsq, step_ptr, grad_scale, found_inf,
    max_grad_norm, param_block_sums, update_block_sums,
    beta1, beta2, beta3, bias_correction1, bias_correction2_sqrt, eps, weight_decay, decay,
    log2_beta1: tl.float64, log2_beta2: tl.float64,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_CLIP: tl.constexpr, AVERAGING: tl.constexpr,
    ADAPT: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):
    """LAMB phase 1: clip, update the moments (stored), and, for the trust ratio of phase 2, the
    per-block sums of squares of the (decayed) weights and of the update. Capturable (``step_ptr``: the group's
    fp32 step count, counted): the bias corrections from it; ``grad_scale``/``found_inf``: GradScaler's
    (see ``_load_grad``; the clip's sum of squares is of the scaled gradients, its root divided by the scale)."""
    if found_inf is not None:
        if tl.load(found_inf) != 0:
            return
    bias_correction1, bias_correction2_sqrt = _lamb_scalars(step_ptr, bias_correction1, bias_correction2_sqrt,
                                                            log2_beta1, log2_beta2)
    pid = tl.program_id(0)
    t, start, numel, offs = _block_of(pid, block_tensor, block_start, numels, BLOCK)
    p_ptr = _slot(param_ptrs, t, P_DTYPE) + offs
    g_ptr = _slot(grad_ptrs, t, G_DTYPE) + offs
    m_ptr = _slot(exp_avg_ptrs, t, tl.float32) + offs
    v_ptr = _slot(exp_avg_sq_ptrs, t, tl.float32) + offs
    c_ptr = None
    if ROUNDING == 2:  # reads the weight only (the store is in lamb_apply_kernel)
        c_ptr = _slot(compensation_ptrs, t, tl.int16) + offs
    clip = 1.0
    if HAS_CLIP:
        norm = tl.sqrt(tl.load(clip_sumsq))
        if grad_scale is not None:
            norm = norm / tl.load(grad_scale)
        clip = tl.maximum(norm / max_grad_norm, 1.0)
    if start + BLOCK <= numel:
        sum_w, sum_u = _lamb_moments_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, None, None, clip, beta1, beta2, beta3,
                                           bias_correction1, bias_correction2_sqrt, eps, weight_decay, decay,
                                           grad_scale, G_DTYPE, AVERAGING, ADAPT, ROUNDING)
    else:
        sum_w, sum_u = _lamb_moments_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs < numel, 0.0, clip, beta1, beta2,
                                           beta3, bias_correction1, bias_correction2_sqrt, eps, weight_decay, decay,
                                           grad_scale, G_DTYPE, AVERAGING, ADAPT, ROUNDING)
    if ADAPT:
        tl.store(param_block_sums + pid, sum_w)
        tl.store(update_block_sums + pid, sum_u)


@triton.jit
def _lamb_apply_block(p_ptr, m_ptr, v_ptr, c_ptr, key, offs, mask, ratio, lr, bias_correction1, bias_correction2_sqrt,
                      eps, weight_decay, decay, P_DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    w = _load_param(p_ptr, c_ptr, mask, ROUNDING) * decay
    m = tl.load(m_ptr, mask=mask)
    v = tl.load(v_ptr, mask=mask)
    u = _lamb_update(m, v, w, bias_correction1, bias_correction2_sqrt, eps, weight_decay)
    _store_param(p_ptr, w - lr * (u * ratio), mask, P_DTYPE, ROUNDING, c_ptr, key, offs)


@triton.jit(do_not_specialize=["rounding_key"])
def lamb_apply_kernel(
    param_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, compensation_ptrs, numels, block_tensor, block_start, param_sumsq,
    update_sumsq, step_ptr, found_inf,
    lr, bias_correction1, bias_correction2_sqrt, eps, weight_decay, decay, rounding_key,
    log2_beta1: tl.float64, log2_beta2: tl.float64,
    P_DTYPE: tl.constexpr, ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr, ROUNDING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """LAMB phase 2: recompute the update from the stored moments, apply it with the trust ratio (the step count
    and ``found_inf`` as in phase 1)."""
    if found_inf is not None:
        if tl.load(found_inf) != 0:
            return
    bias_correction1, bias_correction2_sqrt = _lamb_scalars(step_ptr, bias_correction1, bias_correction2_sqrt,
                                                            log2_beta1, log2_beta2)
    t, start, numel, offs = _block_of(tl.program_id(0), block_tensor, block_start, numels, BLOCK)
    p_ptr = _slot(param_ptrs, t, P_DTYPE) + offs
    m_ptr = _slot(exp_avg_ptrs, t, tl.float32) + offs
    v_ptr = _slot(exp_avg_sq_ptrs, t, tl.float32) + offs
    ratio = 1.0
    if ADAPT:
        w_norm = tl.sqrt(tl.load(param_sumsq + t))
        u_norm = tl.sqrt(tl.load(update_sumsq + t))
        ratio = tl.where((w_norm > 0) & (u_norm > 0), w_norm / tl.where(u_norm > 0, u_norm, 1.0), 1.0)
        if TRUST_CLIP:
            ratio = tl.minimum(ratio, 1.0)
    c_ptr = None
    if ROUNDING == 2:
        c_ptr = _slot(compensation_ptrs, t, tl.int16) + offs
    key = None
    if ROUNDING == 1:
        key = _tensor_key(rounding_key, t)
    if start + BLOCK <= numel:
        _lamb_apply_block(p_ptr, m_ptr, v_ptr, c_ptr, key, offs, None, ratio, lr, bias_correction1,
                          bias_correction2_sqrt, eps, weight_decay, decay, P_DTYPE, ROUNDING)
    else:
        _lamb_apply_block(p_ptr, m_ptr, v_ptr, c_ptr, key, offs, offs < numel, ratio, lr, bias_correction1,
                          bias_correction2_sqrt, eps, weight_decay, decay, P_DTYPE, ROUNDING)
