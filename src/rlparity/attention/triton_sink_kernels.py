"""Triton kernels for sink attention: forward, backward preprocess, dK/dV and dQ.

Conventions shared by every kernel (the host side is `triton_sink.py`):
- q, o, dO: [B, Hq, S, D] and k, v: [B, Hkv, S_k, D], passed as base pointers plus batch, head and sequence
  strides; the head_dim stride is 1. lse, lse2 (lse / ln 2, kept for the backward) and delta: contiguous
  float32 [B, Hq, S].
- Program axis 2 is the batch index, or the sequence index of packed input (then batch is 0 and the
  sequence's tokens start at cu_seqlens[z] in q, k and v alike).
- Scores are kept in the base-2 domain: s2 = q.k * scale * log2(e), sink2 = sigma * log2(e), so the
  exponentials are exp2. lse is stored in the natural domain.
- Queries are the last len_q of the len_k positions (bottom-right): query row i sits at position
  i + len_k - len_q. A query at position p sees key j when j <= p (causal) and j > p - window.
- Each loop over a key (or query) range is split into three block-aligned phases: blocks that need the
  visibility mask, blocks every (query, key) pair of which is visible (no mask), and masked blocks again.
  Blocks with no visible pair are never visited: the loop bounds exclude them.
- EMULATE_BF16: Triton's interpreter stores bfloat16 as raw uint16 and its tl.dot multiplies the bit
  patterns (triton-lang/triton#11584), and its float32 -> bfloat16 cast truncates. Under the interpreter
  bfloat16 tiles are therefore widened to float32 on load, operands that the GPU kernel rounds to
  bfloat16 (P, dS) are rounded to nearest-even in float32 bits, and stores round the same way first.
  On a GPU this flag is False and the kernel runs native bfloat16 MMAs.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): log(x) == log2(x) * LN2
# Triton turns an int argument equal to 1 into a compile-time constant; decode (seq_q == 1), MHA (groups
# == 1) and window 1 would each compile a variant. These stay runtime values.
_RUNTIME_INTS = ("seq_q", "seq_k", "groups", "window")


# Triton's library functions (tl.zeros, tl.max, tl.sum, tl.cdiv) are jit functions fixed as compiled or
# interpreted when triton is first imported; if that happened before TRITON_INTERPRET=1 was set, the
# interpreter cannot call them. So these kernels call only builtins: tl.full, and tl.reduce with the
# combine functions tl.max and tl.sum use, which the interpreter recognises and runs as numpy reductions.


@triton.jit
def _row_max(x):
    return tl.reduce(x, 1, tl.standard._elementwise_max)


@triton.jit
def _row_sum(x):
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def _round_bf16(x):
    """Round float32 to the nearest bfloat16 (ties to even), kept in float32 bits."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, ELEM: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x (float32) as the next tl.dot's operand: rounded to the input dtype, as FlashAttention does."""
    if EMULATE_BF16:
        return _round_bf16(x)
    else:
        return x.to(ELEM)


@triton.jit
def _store_value(x, ELEM: tl.constexpr, EMULATE_BF16: tl.constexpr):
    if EMULATE_BF16:
        return _round_bf16(x).to(ELEM)  # exact: the low 16 bits are already zero
    else:
        return x.to(ELEM)


@triton.jit
def _load_tile(base, rows, stride, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """[len(rows), BLOCK_D] tile of a [S, D] slice; rows >= n_rows and columns >= HEAD_DIM read as 0."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    if EMULATE_BF16:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_tile(base, rows, stride, n_rows, offs_d, value, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _sequence(CuSeqlens, z, seq_q, seq_k, IS_VARLEN: tl.constexpr):
    """(batch index, first token, len_q, len_k) of the program's sequence."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + z)
        length = tl.load(CuSeqlens + z + 1) - start
        return 0, start.to(tl.int64), length, length
    else:
        return z.to(tl.int64), 0, seq_q, seq_k


@triton.jit
def _phases(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split the blocks covering [lo, hi) into masked [a, b), mask-free [b, c) and masked [c, hi).

    [full_lo, full_hi) is the part of the range where no pair needs masking; lo >= 0. An empty range
    (hi <= lo) gives three empty phases, so not a single block is visited.
    """
    hi = tl.maximum(hi, lo)
    a = tl.where(hi > lo, (lo // BLOCK) * BLOCK, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    b = tl.minimum((full_lo + BLOCK - 1) // BLOCK * BLOCK, hi)
    c = tl.maximum((full_hi // BLOCK) * BLOCK, b)
    return a, b, c, hi


@triton.jit
def _visible(q_pos, k_idx, len_k, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[BLOCK_M, BLOCK_N] (or [1, BLOCK_N] with no causal or window mask): key k_idx is in range and visible."""
    visible = (k_idx < len_k)[None, :]  # [1, BLOCK_N]; broadcasts to [BLOCK_M, BLOCK_N] below or in tl.where
    if CAUSAL:
        visible = visible & (k_idx[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (k_idx[None, :] > q_pos[:, None] - window)
    return visible


# --------------------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_keys(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start, stop, q_pos, len_k, window, qk_scale,
              offs_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, ELEM: tl.constexpr,
              EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        k_idx = n0 + offs_n
        k = _load_tile(k_base, k_idx, stride_ks, len_k, offs_d, HEAD_DIM, BLOCK_D, MASK, EMULATE_BF16)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK:
            s = tl.where(_visible(q_pos, k_idx, len_k, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, _row_max(s))
        # m_new is -inf only for a sink of -inf (no sink) and no visible key yet: exponentiate against 0
        # there, so that exp2(-inf - -inf) never makes a NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_base)
        p = tl.exp2(s - m_base[:, None])
        l_i = l_i * alpha + _row_sum(p)
        v = _load_tile(v_base, k_idx, stride_vs, len_k, offs_d, HEAD_DIM, BLOCK_D, MASK, EMULATE_BF16)
        acc = tl.dot(_operand(p, ELEM, EMULATE_BF16), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _fwd_kernel(Q, K, V, Sinks, Out, Lse, Lse2, CuSeqlens,
                stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                stride_lb, stride_lh,
                seq_q, seq_k, groups, qk_scale, window,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
                EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Last query blocks first: under a causal mask they see the most keys, so the longest programs start
    # early and the short ones fill the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b, start, len_q, len_k = _sequence(CuSeqlens, tl.program_id(2), seq_q, seq_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    h64 = h.to(tl.int64)
    kv_h = h64 // groups
    offset = len_k - len_q  # position of query row i is i + offset
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = offs_m + offset
    ELEM: tl.constexpr = Q.dtype.element_ty

    q_base = Q + b * stride_qb + h64 * stride_qh + start * stride_qs
    k_base = K + b * stride_kb + kv_h * stride_kh + start * stride_ks
    v_base = V + b * stride_vb + kv_h * stride_vh + start * stride_vs
    q = _load_tile(q_base, offs_m, stride_qs, len_q, offs_d, HEAD_DIM, BLOCK_D, True, EMULATE_BF16)

    sink = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
    # The sink opens the normaliser: m = sigma, l = exp2(sigma - m) = 1 (0 for a sink of -inf: no sink).
    m_i = tl.full([BLOCK_M], 0.0, tl.float32) + sink
    l_i = tl.full([BLOCK_M], 0.0, tl.float32) + tl.where(sink == float("-inf"), 0.0, 1.0)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    lo = 0
    hi = len_k
    full_lo = 0
    full_hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, m0 + BLOCK_M + offset)  # last row's position + 1
        full_hi = m0 + offset + 1  # keys at or before the first row's position
    if HAS_WINDOW:
        lo = tl.maximum(m0 + offset - window + 1, 0)  # oldest key of the first row
        full_lo = m0 + BLOCK_M - 1 + offset - window + 1  # keys inside the last row's window
    a, b_, c, hi = _phases(lo, hi, full_lo, full_hi, BLOCK_N)
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, a, b_, q_pos, len_k, window,
                              qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW,
                              ELEM, EMULATE_BF16, DOT_PRECISION)
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, b_, c, q_pos, len_k, window,
                              qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_WINDOW,
                              ELEM, EMULATE_BF16, DOT_PRECISION)
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, c, hi, q_pos, len_k, window,
                              qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW,
                              ELEM, EMULATE_BF16, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_base = Out + b * stride_ob + h64 * stride_oh + start * stride_os
    _store_tile(o_base, offs_m, stride_os, len_q, offs_d, _store_value(out, ELEM, EMULATE_BF16), HEAD_DIM)
    lse2 = m_i + tl.log2(l_i)
    row_offset = b * stride_lb + h64 * stride_lh + start + offs_m
    tl.store(Lse + row_offset, lse2 * 0.6931471805599453, mask=offs_m < len_q)
    # The backward reads the base-2 value: converting the returned lse back would add two roundings to
    # every recomputed exponent.
    tl.store(Lse2 + row_offset, lse2, mask=offs_m < len_q)


# -------------------------------------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=("seq_q", "heads_q"))
def _bwd_preprocess(Out, DOut, DLse, Lse2, Sinks, Delta, DSinkPart,
                    stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
                    stride_gb, stride_gh, stride_gs, stride_lb, stride_lh,
                    seq_q, heads_q,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta_i = dO_i.O_i - dLSE_i, and this block's share of dsink = -sum_i P_sink,i * delta_i.

    With delta folded this way dS_ij = P_ij (dP_ij - delta_i) carries the dLSE path to dQ and dK, and
    dsink_h = sum_i P_sink,i (dLSE_i - dO_i.O_i) is the DESIGN.md formula. Rows are independent, so packed
    input needs no sequence bounds here.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m < seq_q
    mask = rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    delta = _row_sum(o * do)
    if HAS_DLSE:
        delta = delta - tl.load(DLse + b * stride_gb + h * stride_gh + offs_m * stride_gs, mask=rows,
                                other=0.0).to(tl.float32)
    row_offset = b * stride_lb + h * stride_lh + offs_m
    tl.store(Delta + row_offset, delta, mask=rows)
    lse2 = tl.load(Lse2 + row_offset, mask=rows, other=0.0)
    sink2 = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
    p_sink = tl.exp2(sink2 - lse2)
    partial = -tl.reduce(tl.where(rows, p_sink * delta, 0.0), 0, tl.standard._sum_combine)
    tl.store(DSinkPart + (b * heads_q + h) * tl.num_programs(0) + pid_m, partial)


@triton.jit
def _dkdv_queries(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, stride_qs, stride_ds, start, stop, k_idx,
                  offset, len_q, len_k, window, qk_scale, offs_m, offs_d,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, ELEM: tl.constexpr,
                  EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for m0 in range(start, stop, BLOCK_M):
        q_idx = m0 + offs_m
        q = _load_tile(q_base, q_idx, stride_qs, len_q, offs_d, HEAD_DIM, BLOCK_D, MASK, EMULATE_BF16)
        do = _load_tile(do_base, q_idx, stride_ds, len_q, offs_d, HEAD_DIM, BLOCK_D, MASK, EMULATE_BF16)
        if MASK:
            lse2 = tl.load(lse2_base + q_idx, mask=q_idx < len_q, other=0.0)
            delta = tl.load(delta_base + q_idx, mask=q_idx < len_q, other=0.0)
        else:
            lse2 = tl.load(lse2_base + q_idx)
            delta = tl.load(delta_base + q_idx)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASK:
            visible = tl.trans(_visible(q_idx + offset, k_idx, len_k, window, CAUSAL, HAS_WINDOW))
            p_t = tl.where(visible & (q_idx < len_q)[None, :], p_t, 0.0)
        dv = tl.dot(_operand(p_t, ELEM, EMULATE_BF16), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(_operand(ds_t, ELEM, EMULATE_BF16), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_head(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, stride_qs, stride_ds, a, b_, c, hi, k_idx,
               offset, len_q, len_k, window, qk_scale, offs_m, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, ELEM: tl.constexpr,
               EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query head's share of a key block's dK, dV: the masked, mask-free and masked query phases."""
    dk, dv = _dkdv_queries(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, stride_qs, stride_ds, a, b_, k_idx,
                           offset, len_q, len_k, window, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, True,
                           CAUSAL, HAS_WINDOW, ELEM, EMULATE_BF16, DOT_PRECISION)
    dk, dv = _dkdv_queries(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, stride_qs, stride_ds, b_, c, k_idx,
                           offset, len_q, len_k, window, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, False,
                           CAUSAL, HAS_WINDOW, ELEM, EMULATE_BF16, DOT_PRECISION)
    dk, dv = _dkdv_queries(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, stride_qs, stride_ds, c, hi, k_idx,
                           offset, len_q, len_k, window, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, True,
                           CAUSAL, HAS_WINDOW, ELEM, EMULATE_BF16, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _bwd_dkdv_kernel(Q, K, V, DOut, Lse2, Delta, DK, DV, CuSeqlens,
                     stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
                     stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                     stride_lb, stride_lh,
                     seq_q, seq_k, groups, qk_scale, scale, window,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
                     EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_PARTIALS: tl.constexpr):
    """One key block of one kv head: dK, dV summed over every query head of its group, in registers.

    GROUP_PARTIALS: each head's share is accumulated from zero and then added, as a per-head matmul
    followed by a sum over the group does. Accumulating the whole group in one chain makes it `groups`
    times longer, and float32 (IEEE products, no operand rounding to dominate) shows it: on an H100 the
    one-chain dV of a 1k-token, 8-heads-per-KV-head case erred 3.4-3.6x more than the naive per-head
    computation. For 16-bit inputs the bfloat16/fp16 rounding of P and dS dominates, and the one chain
    keeps two fewer [BLOCK_N, BLOCK_D] float32 tiles in registers.
    """
    pid_n = tl.program_id(0)
    kv_h = tl.program_id(1).to(tl.int64)
    b, start, len_q, len_k = _sequence(CuSeqlens, tl.program_id(2), seq_q, seq_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    offset = len_k - len_q
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_idx = n0 + tl.arange(0, BLOCK_N)
    ELEM: tl.constexpr = Q.dtype.element_ty

    k = _load_tile(K + b * stride_kb + kv_h * stride_kh + start * stride_ks, k_idx, stride_ks, len_k, offs_d,
                   HEAD_DIM, BLOCK_D, True, EMULATE_BF16)
    v = _load_tile(V + b * stride_vb + kv_h * stride_vh + start * stride_vs, k_idx, stride_vs, len_k, offs_d,
                   HEAD_DIM, BLOCK_D, True, EMULATE_BF16)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)

    # Query rows i (position i + offset) that see some key of this block, and those that see all of them.
    lo = 0
    hi = len_q
    full_lo = 0
    full_hi = len_q
    if CAUSAL:
        lo = tl.maximum(n0 - offset, 0)
        full_lo = n0 + BLOCK_N - 1 - offset
    if HAS_WINDOW:
        hi = tl.minimum(len_q, n0 + BLOCK_N - 1 + window - offset)
        full_hi = n0 + window - offset
    full_hi = tl.where(n0 + BLOCK_N <= len_k, full_hi, 0)  # a partial key block is always masked
    a, b_, c, hi = _phases(lo, hi, full_lo, full_hi, BLOCK_M)

    for g in range(0, groups):
        h = kv_h * groups + g
        q_base = Q + b * stride_qb + h * stride_qh + start * stride_qs
        do_base = DOut + b * stride_db + h * stride_dh + start * stride_ds
        lse2_base = Lse2 + b * stride_lb + h * stride_lh + start
        delta_base = Delta + b * stride_lb + h * stride_lh + start
        if GROUP_PARTIALS:
            zeros = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
            dk_h, dv_h = _dkdv_head(zeros, zeros, k, v, q_base, do_base, lse2_base, delta_base, stride_qs, stride_ds,
                                    a, b_, c, hi, k_idx, offset, len_q, len_k, window, qk_scale, offs_m, offs_d,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, HAS_WINDOW, ELEM, EMULATE_BF16, DOT_PRECISION)
            dk += dk_h
            dv += dv_h
        else:
            dk, dv = _dkdv_head(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, stride_qs, stride_ds, a, b_, c,
                                hi, k_idx, offset, len_q, len_k, window, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D,
                                BLOCK_M, CAUSAL, HAS_WINDOW, ELEM, EMULATE_BF16, DOT_PRECISION)

    dk_base = DK + b * stride_dkb + kv_h * stride_dkh + start * stride_dks
    dv_base = DV + b * stride_dvb + kv_h * stride_dvh + start * stride_dvs
    _store_tile(dk_base, k_idx, stride_dks, len_k, offs_d, _store_value(dk * scale, ELEM, EMULATE_BF16), HEAD_DIM)
    _store_tile(dv_base, k_idx, stride_dvs, len_k, offs_d, _store_value(dv, ELEM, EMULATE_BF16), HEAD_DIM)


@triton.jit
def _dq_keys(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, start, stop, q_pos, len_k, window,
             qk_scale, offs_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, ELEM: tl.constexpr,
             EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        k_idx = n0 + offs_n
        k = _load_tile(k_base, k_idx, stride_ks, len_k, offs_d, HEAD_DIM, BLOCK_D, MASK, EMULATE_BF16)
        v = _load_tile(v_base, k_idx, stride_vs, len_k, offs_d, HEAD_DIM, BLOCK_D, MASK, EMULATE_BF16)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(_visible(q_pos, k_idx, len_k, window, CAUSAL, HAS_WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_operand(ds, ELEM, EMULATE_BF16), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _bwd_dq_kernel(Q, K, V, DOut, Lse2, Delta, DQ, CuSeqlens,
                   stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
                   stride_dqb, stride_dqh, stride_dqs, stride_lb, stride_lh,
                   seq_q, seq_k, groups, qk_scale, scale, window,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
                   EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (last, under a causal mask) blocks first
    h = tl.program_id(1).to(tl.int64)
    b, start, len_q, len_k = _sequence(CuSeqlens, tl.program_id(2), seq_q, seq_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    kv_h = h // groups
    offset = len_k - len_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = offs_m + offset
    ELEM: tl.constexpr = Q.dtype.element_ty

    q = _load_tile(Q + b * stride_qb + h * stride_qh + start * stride_qs, offs_m, stride_qs, len_q, offs_d,
                   HEAD_DIM, BLOCK_D, True, EMULATE_BF16)
    do = _load_tile(DOut + b * stride_db + h * stride_dh + start * stride_ds, offs_m, stride_ds, len_q, offs_d,
                    HEAD_DIM, BLOCK_D, True, EMULATE_BF16)
    row_offset = b * stride_lb + h * stride_lh + start + offs_m
    lse2 = tl.load(Lse2 + row_offset, mask=offs_m < len_q, other=0.0)
    delta = tl.load(Delta + row_offset, mask=offs_m < len_q, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh + start * stride_ks
    v_base = V + b * stride_vb + kv_h * stride_vh + start * stride_vs
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    lo = 0
    hi = len_k
    full_lo = 0
    full_hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, m0 + BLOCK_M + offset)
        full_hi = m0 + offset + 1
    if HAS_WINDOW:
        lo = tl.maximum(m0 + offset - window + 1, 0)
        full_lo = m0 + BLOCK_M - 1 + offset - window + 1
    a, b_, c, hi = _phases(lo, hi, full_lo, full_hi, BLOCK_N)
    dq = _dq_keys(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, a, b_, q_pos, len_k, window,
                  qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, ELEM,
                  EMULATE_BF16, DOT_PRECISION)
    dq = _dq_keys(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, b_, c, q_pos, len_k, window,
                  qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_WINDOW, ELEM,
                  EMULATE_BF16, DOT_PRECISION)
    dq = _dq_keys(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, c, hi, q_pos, len_k, window,
                  qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW, ELEM,
                  EMULATE_BF16, DOT_PRECISION)
    dq_base = DQ + b * stride_dqb + h * stride_dqh + start * stride_dqs
    _store_tile(dq_base, offs_m, stride_dqs, len_q, offs_d, _store_value(dq * scale, ELEM, EMULATE_BF16), HEAD_DIM)


# Whether triton.jit produced interpreted kernels (TRITON_INTERPRET=1 was set when this module was imported).
@triton.jit(do_not_specialize=("n",))
def _interpreter_check(Out, n):
    """Counts to n in a loop whose bound is computed from a runtime int, as every kernel here loops."""
    total = tl.full([1], 0.0, tl.float32)
    for _ in range(0, tl.maximum(n, 0), 1):
        total += 1.0
    tl.store(Out + tl.arange(0, 1), total)


INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)
