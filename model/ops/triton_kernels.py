"""Triton kernels for lightning attention (Lightning Attention-2 schedule), forward and backward.

Same math and notation as ``model/ops/chunked.py``: blocks of BLOCK tokens, M_is = λ^{i-s} (i ≥ s),
qd_i = λ^{i+1}, kd_s = λ^{L-1-s} (s < L), bd = λ^L with L the real tokens of the block. Each program owns one
(batch·head, Dv slice of BV columns) and walks the blocks in order, keeping its (DKP, BV) state slice in fp32
registers. Contractions over Dv (dQ, dK) are written as per-slice partials that the caller sums.

Layout: q, k (BH, T, DK); v, o, do (BH, T, DV); states (BH, DK, DV); all contiguous. DKP is DK rounded up to a
power of two (≥ 16); rows past T and columns past DK / DV are masked. Loads are cast to fp32 and every dot
accumulates in fp32 (PREC "ieee" for fp32 inputs, "tf32" for 16-bit ones).
Must be imported after TRITON_INTERPRET is set when running on CPU.
"""

import triton
import triton.language as tl


@triton.jit
def _decays(slope, ri, L, BLOCK: tl.constexpr):
    """Intra-block mask M (BLOCK, BLOCK), qd (BLOCK,), kd (BLOCK,) and bd for a block of L real tokens."""
    dist = ri[:, None] - ri[None, :]
    M = tl.where(dist >= 0, tl.exp(-slope * tl.where(dist >= 0, dist, 0).to(tl.float32)), 0.0)
    qd = tl.exp(-slope * (ri + 1).to(tl.float32))
    kdist = L - 1 - ri
    kd = tl.where(kdist >= 0, tl.exp(-slope * tl.where(kdist >= 0, kdist, 0).to(tl.float32)), 0.0)
    bd = tl.exp(-slope * tl.cast(L, tl.float32))
    return M, qd, kd, bd


@triton.jit
def _load(base, rows, cols, T, D, D_TOTAL):
    """Load a (rows, cols) tile of a row-major (T, D_TOTAL) matrix as fp32, zero outside T x D."""
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    return tl.load(base + rows[:, None] * D_TOTAL + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def lightning_fwd_kernel(Q, K, V, O, S_IN, S_OUT, SLOPE, T, H, NB, DK, DV,
                         HAS_S_IN: tl.constexpr, STORE_S_OUT: tl.constexpr, PREC: tl.constexpr,
                         BLOCK: tl.constexpr, DKP: tl.constexpr, BV: tl.constexpr):
    """O_j = [(Q_j K_jᵀ) ⊙ M] V_j + (qd ⊙ Q_j) S;  S ← bd S + (kd ⊙ K_j)ᵀ V_j."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    slope = tl.load(SLOPE + pid_bh % H).to(tl.float32)
    ri = tl.arange(0, BLOCK)
    rk = tl.arange(0, DKP)
    rv = pid_v * BV + tl.arange(0, BV)
    q_base = Q + pid_bh * T * DK
    k_base = K + pid_bh * T * DK
    v_base = V + pid_bh * T * DV
    o_base = O + pid_bh * T * DV
    s_off = pid_bh * DK * DV + rk[:, None] * DV + rv[None, :]
    s_mask = (rk[:, None] < DK) & (rv[None, :] < DV)
    if HAS_S_IN:
        S = tl.load(S_IN + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((DKP, BV), dtype=tl.float32)
    for j in range(0, NB):
        rows = j * BLOCK + ri
        M, qd, kd, bd = _decays(slope, ri, tl.minimum(T - j * BLOCK, BLOCK), BLOCK)
        q = _load(q_base, rows, rk, T, DK, DK)
        k = _load(k_base, rows, rk, T, DK, DK)
        v = _load(v_base, rows, rv, T, DV, DV)
        p = tl.dot(q, tl.trans(k), input_precision=PREC) * M
        o = tl.dot(p, v, input_precision=PREC) + tl.dot(q * qd[:, None], S, input_precision=PREC)
        o_mask = (rows[:, None] < T) & (rv[None, :] < DV)
        tl.store(o_base + rows[:, None] * DV + rv[None, :], o.to(O.dtype.element_ty), mask=o_mask)
        S = S * bd + tl.dot(tl.trans(k * kd[:, None]), v, input_precision=PREC)
    if STORE_S_OUT:
        tl.store(S_OUT + s_off, S, mask=s_mask)


@triton.jit
def lightning_bwd_dq_kernel(K, V, DO, DQ_PART, S_IN, SLOPE, T, H, NB, DK, DV, BH,
                            HAS_S_IN: tl.constexpr, PREC: tl.constexpr,
                            BLOCK: tl.constexpr, DKP: tl.constexpr, BV: tl.constexpr):
    """Forward sweep: dQ_j = [(dO_j V_jᵀ) ⊙ M] K_j + qd ⊙ (dO_j Sᵀ), partial over this Dv slice."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    slope = tl.load(SLOPE + pid_bh % H).to(tl.float32)
    ri = tl.arange(0, BLOCK)
    rk = tl.arange(0, DKP)
    rv = pid_v * BV + tl.arange(0, BV)
    k_base = K + pid_bh * T * DK
    v_base = V + pid_bh * T * DV
    do_base = DO + pid_bh * T * DV
    dq_base = DQ_PART + (pid_v * BH + pid_bh) * T * DK
    s_off = pid_bh * DK * DV + rk[:, None] * DV + rv[None, :]
    s_mask = (rk[:, None] < DK) & (rv[None, :] < DV)
    if HAS_S_IN:
        S = tl.load(S_IN + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((DKP, BV), dtype=tl.float32)
    for j in range(0, NB):
        rows = j * BLOCK + ri
        M, qd, kd, bd = _decays(slope, ri, tl.minimum(T - j * BLOCK, BLOCK), BLOCK)
        k = _load(k_base, rows, rk, T, DK, DK)
        v = _load(v_base, rows, rv, T, DV, DV)
        do = _load(do_base, rows, rv, T, DV, DV)
        a = tl.dot(do, tl.trans(v), input_precision=PREC) * M
        dq = tl.dot(a, k, input_precision=PREC) + tl.dot(do, tl.trans(S), input_precision=PREC) * qd[:, None]
        dq_mask = (rows[:, None] < T) & (rk[None, :] < DK)
        tl.store(dq_base + rows[:, None] * DK + rk[None, :], dq, mask=dq_mask)
        S = S * bd + tl.dot(tl.trans(k * kd[:, None]), v, input_precision=PREC)


@triton.jit
def lightning_bwd_dkv_kernel(Q, K, V, DO, DK_PART, DVO, DS_OUT, DS_IN, SLOPE, T, H, NB, DK, DV, BH,
                             HAS_DS_OUT: tl.constexpr, STORE_DS_IN: tl.constexpr, PREC: tl.constexpr,
                             BLOCK: tl.constexpr, DKP: tl.constexpr, BV: tl.constexpr):
    """Reverse sweep carrying dS (the gradient of the state leaving the block):
    dK_j = [(dO_j V_jᵀ) ⊙ M]ᵀ Q_j + kd ⊙ (V_j dSᵀ) (partial over the Dv slice),
    dV_j = [(Q_j K_jᵀ) ⊙ M]ᵀ dO_j + (kd ⊙ K_j) dS, then dS ← bd dS + (qd ⊙ Q_j)ᵀ dO_j."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    slope = tl.load(SLOPE + pid_bh % H).to(tl.float32)
    ri = tl.arange(0, BLOCK)
    rk = tl.arange(0, DKP)
    rv = pid_v * BV + tl.arange(0, BV)
    q_base = Q + pid_bh * T * DK
    k_base = K + pid_bh * T * DK
    v_base = V + pid_bh * T * DV
    do_base = DO + pid_bh * T * DV
    dk_base = DK_PART + (pid_v * BH + pid_bh) * T * DK
    dv_base = DVO + pid_bh * T * DV
    s_off = pid_bh * DK * DV + rk[:, None] * DV + rv[None, :]
    s_mask = (rk[:, None] < DK) & (rv[None, :] < DV)
    if HAS_DS_OUT:
        dS = tl.load(DS_OUT + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((DKP, BV), dtype=tl.float32)
    for jj in range(0, NB):
        j = NB - 1 - jj
        rows = j * BLOCK + ri
        M, qd, kd, bd = _decays(slope, ri, tl.minimum(T - j * BLOCK, BLOCK), BLOCK)
        q = _load(q_base, rows, rk, T, DK, DK)
        k = _load(k_base, rows, rk, T, DK, DK)
        v = _load(v_base, rows, rv, T, DV, DV)
        do = _load(do_base, rows, rv, T, DV, DV)
        a = tl.dot(do, tl.trans(v), input_precision=PREC) * M
        dk = tl.dot(tl.trans(a), q, input_precision=PREC)
        dk += tl.dot(v, tl.trans(dS), input_precision=PREC) * kd[:, None]
        dk_mask = (rows[:, None] < T) & (rk[None, :] < DK)
        tl.store(dk_base + rows[:, None] * DK + rk[None, :], dk, mask=dk_mask)
        p = tl.dot(q, tl.trans(k), input_precision=PREC) * M
        dv = tl.dot(tl.trans(p), do, input_precision=PREC)
        dv += tl.dot(k * kd[:, None], dS, input_precision=PREC)
        dv_mask = (rows[:, None] < T) & (rv[None, :] < DV)
        tl.store(dv_base + rows[:, None] * DV + rv[None, :], dv.to(DVO.dtype.element_ty), mask=dv_mask)
        dS = dS * bd + tl.dot(tl.trans(q * qd[:, None]), do, input_precision=PREC)
    if STORE_DS_IN:
        tl.store(DS_IN + s_off, dS, mask=s_mask)
