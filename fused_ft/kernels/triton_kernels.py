"""Triton kernels for the five updates; launchers live in ``triton_launch``.

Multi-tensor layout (one launch covers every tensor of a dtype combination): each tensor slot
(``p``: params, ``g``: grads, ``s0``/``s1``/``s2``: state) is an int64 table of addresses, one per
tensor; the block table maps each program to (tensor index ``blk_t``, element offset ``blk_s``).
Address tables and block coordinates are read inline rather than through small @triton.jit
helpers: Triton's CPU interpreter re-patches the language on every nested call, which made each
program (and the CI tests) about 40% slower. All math is fp32: values are loaded in their storage dtype, converted, and the parameter is stored
once in its own dtype. Per-step hyperparameters are float arguments, which Triton never
specializes on, so a changing learning rate or bias correction never recompiles.
"""
import triton
import triton.language as tl


@triton.jit
def _store_param(ptr, x, mask, DTYPE: tl.constexpr):
    """Store fp32 ``x`` in the parameter's dtype, rounding to nearest-even.

    bf16 is rounded with integer arithmetic: Triton's CPU interpreter (3.8) truncates fp32 to
    bf16 even with fp_downcast_rounding="rtne", which walks every bf16 parameter towards zero.
    The bit trick is exact round-to-nearest-even on GPUs too, so both paths agree with torch.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(ptr, tl.where(x != x, x.to(tl.bfloat16), rounded), mask=mask)  # NaN stays NaN
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)


@triton.jit
def _tensor_sum(partials, blk_first, blk_count, t, RBLOCK: tl.constexpr):
    """Sum of the per-block partials of tensor ``t`` (deterministic: a fixed order, no atomics)."""
    first = tl.load(blk_first + t)
    end = first + tl.load(blk_count + t)
    acc = tl.zeros((RBLOCK,), dtype=tl.float32)
    for i in range(first, end, RBLOCK):
        idx = i + tl.arange(0, RBLOCK)
        acc += tl.load(partials + idx, mask=idx < end, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _all_sum(partials, count, RBLOCK: tl.constexpr):
    acc = tl.zeros((RBLOCK,), dtype=tl.float32)
    for i in range(0, count, RBLOCK):
        idx = i + tl.arange(0, RBLOCK)
        acc += tl.load(partials + idx, mask=idx < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def sumsq_kernel(
    a, b, numels, blk_t, blk_s, num_blocks, out_a, out_b,
    A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, TWO: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sums of squares of slot ``a`` (and ``b`` when TWO) per program, grid-striding over blocks.

    With one program per block, ``out`` holds per-block partials (tensor norms follow); with fewer
    programs, a short list of partials of the global sum (LAMB's gradient clipping).
    """
    pid = tl.program_id(0)
    acc_a = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
    for blk in range(pid, num_blocks, tl.num_programs(0)):
        t = tl.load(blk_t + blk)
        offs = tl.load(blk_s + blk) + tl.arange(0, BLOCK)
        mask = offs < tl.load(numels + t)
        x = tl.load(tl.load(a + t).to(tl.pointer_type(A_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
        acc_a += x * x
        if TWO:
            y = tl.load(tl.load(b + t).to(tl.pointer_type(B_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
            acc_b += y * y
    tl.store(out_a + pid, tl.sum(acc_a, axis=0))
    if TWO:
        tl.store(out_b + pid, tl.sum(acc_b, axis=0))


@triton.jit
def _momentum(p, g, s0, t, offs, mask, buf_keep, buf_scale, momentum, NESTEROV: tl.constexpr):
    """torch's momentum: b = keep*b + scale*g (a new, zeroed buffer has keep=0, scale=1: b = g)."""
    b_ptr = tl.load(s0 + t).to(tl.pointer_type(tl.float32))
    buf = buf_keep * tl.load(b_ptr + offs, mask=mask) + buf_scale * g
    tl.store(b_ptr + offs, buf, mask=mask)
    if NESTEROV:
        return g + momentum * buf
    return buf


@triton.jit
def sgd_kernel(
    p, g, s0, numels, blk_t, blk_s,
    lr, weight_decay, grad_sign, buf_keep, buf_scale, momentum,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """SGD: tl[p] params, tl[g] grads, tl[s0] momentum buffers (fp32; unused without momentum)."""
    t = tl.load(blk_t + tl.program_id(0))
    offs = tl.load(blk_s + tl.program_id(0)) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    p_ptr = tl.load(p + t).to(tl.pointer_type(P_DTYPE))
    w = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    d = tl.load(tl.load(g + t).to(tl.pointer_type(G_DTYPE)) + offs, mask=mask).to(tl.float32) * grad_sign + weight_decay * w
    if HAS_MOMENTUM:
        d = _momentum(p, d, s0, t, offs, mask, buf_keep, buf_scale, momentum, NESTEROV)
    _store_param(p_ptr + offs, w - lr * d, mask, P_DTYPE)


@triton.jit
def adamw_kernel(
    p, g, s0, s1, s2, numels, blk_t, blk_s,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, grad_sign,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """AdamW: tl[s0] exp_avg, tl[s1] exp_avg_sq, tl[s2] max_exp_avg_sq (amsgrad), all fp32.

    ``decay`` = 1 - lr*weight_decay, ``step_size`` = lr / (1 - beta1^t).
    """
    t = tl.load(blk_t + tl.program_id(0))
    offs = tl.load(blk_s + tl.program_id(0)) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    p_ptr = tl.load(p + t).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(s0 + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(s1 + t).to(tl.pointer_type(tl.float32))
    w = tl.load(p_ptr + offs, mask=mask).to(tl.float32) * decay
    d = tl.load(tl.load(g + t).to(tl.pointer_type(G_DTYPE)) + offs, mask=mask).to(tl.float32) * grad_sign
    m = tl.load(m_ptr + offs, mask=mask)
    m = m + (1.0 - beta1) * (d - m)  # torch's lerp
    v = beta2 * tl.load(v_ptr + offs, mask=mask) + (1.0 - beta2) * d * d
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        vmax_ptr = tl.load(s2 + t).to(tl.pointer_type(tl.float32))
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v)
        tl.store(vmax_ptr + offs, v, mask=mask)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    _store_param(p_ptr + offs, w - step_size * (m / denom), mask, P_DTYPE)


@triton.jit
def lars_kernel(
    p, g, s0, numels, blk_t, blk_s, w_partials, g_partials, blk_first, blk_count,
    lr, weight_decay, trust_coeff, eps, buf_keep, buf_scale, momentum,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):
    """LARS: tensor norms from ``sumsq_kernel`` partials, then the trust-ratio-scaled SGD update."""
    t = tl.load(blk_t + tl.program_id(0))
    offs = tl.load(blk_s + tl.program_id(0)) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    p_ptr = tl.load(p + t).to(tl.pointer_type(P_DTYPE))
    w = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    d = tl.load(tl.load(g + t).to(tl.pointer_type(G_DTYPE)) + offs, mask=mask).to(tl.float32)
    if ADAPT:
        w_norm = tl.sqrt(_tensor_sum(w_partials, blk_first, blk_count, t, RBLOCK))
        g_norm = tl.sqrt(_tensor_sum(g_partials, blk_first, blk_count, t, RBLOCK))
        ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)  # eps > 0 or g_norm > 0 below
        ratio = tl.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
        if TRUST_CLIP:
            ratio = tl.minimum(ratio / lr, 1.0)
        d = (d + weight_decay * w) * ratio
    if HAS_MOMENTUM:
        d = _momentum(p, d, s0, t, offs, mask, buf_keep, buf_scale, momentum, NESTEROV)
    _store_param(p_ptr + offs, w - lr * d, mask, P_DTYPE)


@triton.jit
def _lamb_update(m, v, w, bias_correction1, bias_correction2_sqrt, eps, weight_decay):
    return (m / bias_correction1) / (tl.sqrt(v) / bias_correction2_sqrt + eps) + weight_decay * w


@triton.jit
def lamb_moments_kernel(
    p, g, s0, s1, numels, blk_t, blk_s, clip_partials, clip_count, max_grad_norm, w_out, u_out,
    beta1, beta2, beta3, bias_correction1, bias_correction2_sqrt, eps, weight_decay, decay,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_CLIP: tl.constexpr, AVERAGING: tl.constexpr,
    BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):
    """LAMB phase 1: clip, update moments (stored), and per-block sums of squares of the
    (decayed) weights and of the update, for the trust ratio of phase 2."""
    t = tl.load(blk_t + tl.program_id(0))
    offs = tl.load(blk_s + tl.program_id(0)) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    d = tl.load(tl.load(g + t).to(tl.pointer_type(G_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CLIP:
        d = d / tl.maximum(tl.sqrt(_all_sum(clip_partials, clip_count, RBLOCK)) / max_grad_norm, 1.0)
    m_ptr = tl.load(s0 + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(s1 + t).to(tl.pointer_type(tl.float32))
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    if AVERAGING:
        m = m + beta3 * (d - m)  # torch's lerp, as timm uses when beta3 == 1 - beta1
    else:
        m = beta1 * m + beta3 * d
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - beta2) * d * d
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    w = tl.load(tl.load(p + t).to(tl.pointer_type(P_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32) * decay
    u = tl.where(mask, _lamb_update(m, v, w, bias_correction1, bias_correction2_sqrt, eps, weight_decay), 0.0)
    pid = tl.program_id(0)
    tl.store(w_out + pid, tl.sum(w * w, axis=0))
    tl.store(u_out + pid, tl.sum(u * u, axis=0))


@triton.jit
def lamb_apply_kernel(
    p, s0, s1, numels, blk_t, blk_s, w_partials, u_partials, blk_first, blk_count,
    lr, bias_correction1, bias_correction2_sqrt, eps, weight_decay, decay,
    P_DTYPE: tl.constexpr, ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr, BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    """LAMB phase 2: recompute the update from the stored moments and apply it with the trust ratio."""
    t = tl.load(blk_t + tl.program_id(0))
    offs = tl.load(blk_s + tl.program_id(0)) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    p_ptr = tl.load(p + t).to(tl.pointer_type(P_DTYPE))
    w = tl.load(p_ptr + offs, mask=mask).to(tl.float32) * decay
    m = tl.load(tl.load(s0 + t).to(tl.pointer_type(tl.float32)) + offs, mask=mask)
    v = tl.load(tl.load(s1 + t).to(tl.pointer_type(tl.float32)) + offs, mask=mask)
    u = _lamb_update(m, v, w, bias_correction1, bias_correction2_sqrt, eps, weight_decay)
    if ADAPT:
        w_norm = tl.sqrt(_tensor_sum(w_partials, blk_first, blk_count, t, RBLOCK))
        u_norm = tl.sqrt(_tensor_sum(u_partials, blk_first, blk_count, t, RBLOCK))
        ratio = tl.where((w_norm > 0) & (u_norm > 0), w_norm / tl.where(u_norm > 0, u_norm, 1.0), 1.0)
        if TRUST_CLIP:
            ratio = tl.minimum(ratio, 1.0)
        u = u * ratio
    _store_param(p_ptr + offs, w - lr * u, mask, P_DTYPE)
