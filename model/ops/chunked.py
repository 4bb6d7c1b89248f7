"""Chunked lightning attention in pure PyTorch with a hand-written backward: the CPU training path.

Lightning Attention-2 schedule. T is padded with zeros to nb blocks of C tokens; block j holds tokens
jC .. jC+C-1, of which L_j are real (L_j = C except maybe the last block). With i, s positions inside a block,
S_j the state entering block j (S_0 = S_in) and S_nb the final state:

    O_j     = [(Q_j K_jᵀ) ⊙ M] V_j + (qd ⊙ Q_j) S_j          M_is = λ^{i-s} (i ≥ s), qd_i = λ^{i+1}
    S_{j+1} = bd_j S_j + (kd_j ⊙ K_j)ᵀ V_j                   kd_js = λ^{L_j-1-s} (s < L_j), bd_j = λ^{L_j}

Per-block lengths make S_nb the exact final state without dividing by powers of λ (which overflow for the
large slopes). Backward, with dS_nb the gradient of the final state:

    dS_j = bd_j dS_{j+1} + (qd ⊙ Q_j)ᵀ dO_j                  (reverse sweep; dS_0 is d(initial_state))
    dQ_j = [(dO_j V_jᵀ) ⊙ M] K_j + qd ⊙ (dO_j S_jᵀ)
    dK_j = [(dO_j V_jᵀ) ⊙ M]ᵀ Q_j + kd_j ⊙ (V_j dS_{j+1}ᵀ)
    dV_j = [(Q_j K_jᵀ) ⊙ M]ᵀ dO_j + (kd_j ⊙ K_j) dS_{j+1}

Everything but the two state recurrences is one batched matmul over all blocks at once; the recurrences are a
loop of nb in-place multiply-adds on (B, H, Dk, Dv) states. Accumulation is fp32 (fp64 for fp64 inputs).
Shapes: q, k (B, H, T, Dk); v (B, H, T, Dv); slope (H,); states (B, H, Dk, Dv). No gradient flows to slope.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.ops.naive import compute_dtype

DEFAULT_BLOCK = 64


class _Decays:
    """Decay factors for nb blocks of C tokens covering T real tokens; slope: (H,). Broadcast shapes:
    M (1, H, 1, C, C); qd (1, H, 1, C, 1); kd (1, H, nb, C, 1); bd (H, nb) laid out for the sweeps."""

    def __init__(self, slope: torch.Tensor, T: int, C: int, dtype: torch.dtype):
        nb = -(-T // C)
        s = slope.to(dtype).view(1, -1, 1, 1, 1)
        i = torch.arange(C, device=slope.device, dtype=dtype)
        dist = i.view(-1, 1) - i.view(1, -1)
        # mask with +inf before exp: masked entries become exp(-inf) = 0, never exp(+large) = inf
        self.M = torch.exp(-s * dist.masked_fill(dist < 0, float("inf")))
        self.qd = torch.exp(-s * (i + 1).view(-1, 1))
        L = torch.full((nb,), C, device=slope.device, dtype=dtype)
        L[-1] = T - (nb - 1) * C
        kdist = L.view(-1, 1) - 1 - i.view(1, -1)  # (nb, C): L_j - 1 - s
        self.kd = torch.exp(-s * kdist.masked_fill(kdist < 0, float("inf")).unsqueeze(-1))
        self.bd = torch.exp(-slope.to(dtype).view(-1, 1) * L.view(1, -1))  # (H, nb)


def _blocks(x: torch.Tensor, C: int, ct: torch.dtype) -> torch.Tensor:
    """(B, H, T, D) -> zero-padded, contiguous (B, H, nb, C, D) in dtype ct."""
    B, H, T, D = x.shape
    pad = -T % C
    x = x.to(ct)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.contiguous().view(B, H, -1, C, D)


def _sweep(U: torch.Tensor, bd: torch.Tensor, init, reverse: bool):
    """Linear recurrence over blocks. U: (B, H, nb, Dk, Dv); bd: (H, nb); init: (B, H, Dk, Dv) or None (zeros).

    Forward:  X_0 = init,  X_{j+1} = bd_j X_j + U_j;  returns (X_0..X_{nb-1}, X_nb).
    Reverse:  X_nb = init, X_j = bd_j X_{j+1} + U_j;  returns (X_1..X_nb, X_0).
    The first result is (B, H, nb, Dk, Dv), contiguous for batched matmuls; the second is (B, H, Dk, Dv).
    """
    nb = U.shape[2]
    X = torch.empty_like(U)
    decay = bd.view(1, -1, nb, 1, 1)
    if reverse:
        X[:, :, -1] = 0 if init is None else init
        X[:, :, :-1] = U[:, :, 1:]
        for j in range(nb - 2, -1, -1):
            X[:, :, j].addcmul_(X[:, :, j + 1], decay[:, :, j + 1])
        return X, U[:, :, 0] + decay[:, :, 0] * X[:, :, 0]
    X[:, :, 0] = 0 if init is None else init
    X[:, :, 1:] = U[:, :, :-1]
    for j in range(nb - 1):
        X[:, :, j + 1].addcmul_(X[:, :, j], decay[:, :, j])
    return X, U[:, :, -1] + decay[:, :, -1] * X[:, :, -1]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, nb, a, b) -> (B*H*nb, a, b) for bmm."""
    return x.view(-1, *x.shape[-2:])


class _ChunkedLightning(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, s_in, block):
        ct = compute_dtype(q.dtype)
        B, H, T, _ = q.shape
        C = min(block, T)
        d = _Decays(slope, T, C, ct)
        Qb, Kb, Vb = (_blocks(x, C, ct) for x in (q, k, v))
        KV = torch.bmm(_flat(Kb * d.kd).transpose(1, 2), _flat(Vb)).view(B, H, -1, q.shape[-1], v.shape[-1])
        S_enter, final = _sweep(KV, d.bd, None if s_in is None else s_in.to(ct), reverse=False)
        del KV
        P = torch.bmm(_flat(Qb), _flat(Kb).transpose(1, 2))
        P.view(B, H, -1, C, C).mul_(d.M)
        O = torch.baddbmm(torch.bmm(_flat(Qb * d.qd), _flat(S_enter)), P, _flat(Vb))
        o = O.view(B, H, -1, v.shape[-1])[:, :, :T].to(q.dtype)
        ctx.save_for_backward(q, k, v, slope, s_in)
        ctx.set_materialize_grads(False)  # an unused final state then costs no zero-filled gradient
        ctx.block = block
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        if do is None:
            do = torch.zeros_like(ctx.saved_tensors[2])
        q, k, v, slope, s_in = ctx.saved_tensors
        ct = compute_dtype(q.dtype)
        B, H, T, _ = q.shape
        C = min(ctx.block, T)
        d = _Decays(slope, T, C, ct)
        Qb, Kb, Vb, dOb = (_blocks(x, C, ct) for x in (q, k, v, do))
        Kd = Kb * d.kd
        KV = torch.bmm(_flat(Kd).transpose(1, 2), _flat(Vb)).view(B, H, -1, q.shape[-1], v.shape[-1])
        S_enter, _ = _sweep(KV, d.bd, None if s_in is None else s_in.to(ct), reverse=False)
        Qd = Qb * d.qd
        QdO = torch.bmm(_flat(Qd).transpose(1, 2), _flat(dOb)).view_as(KV)
        del KV
        dfinal = None if dfinal is None else dfinal.to(ct)
        dS_next, ds_in = _sweep(QdO, d.bd, dfinal, reverse=True)  # dS_next[j]: grad of the state leaving block j
        del QdO
        Q3, K3, V3, dO3 = (_flat(x) for x in (Qb, Kb, Vb, dOb))

        A = torch.bmm(dO3, V3.transpose(1, 2))
        A.view(B, H, -1, C, C).mul_(d.M)
        dQ = torch.baddbmm(torch.bmm(dO3, _flat(S_enter).transpose(1, 2)).view_as(Qb).mul_(d.qd).view_as(Q3), A, K3)
        del S_enter
        dK = torch.baddbmm(torch.bmm(V3, _flat(dS_next).transpose(1, 2)).view_as(Kb).mul_(d.kd).view_as(K3),
                           A.transpose(1, 2), Q3)
        del A
        P = torch.bmm(Q3, K3.transpose(1, 2))
        P.view(B, H, -1, C, C).mul_(d.M)
        dV = torch.baddbmm(torch.bmm(_flat(Kd), _flat(dS_next)), P.transpose(1, 2), dO3)

        def unblock(x, like):
            return x.view(B, H, -1, x.shape[-1])[:, :, :T].to(like.dtype)

        ds_in = None if s_in is None else ds_in.to(s_in.dtype)
        return unblock(dQ, q), unblock(dK, k), unblock(dV, v), None, ds_in, None


def chunked_attn(q, k, v, slope, initial_state=None, output_final_state=False, block=DEFAULT_BLOCK):
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv); slope: (H,); initial_state: (B, H, Dk, Dv) or None.
    Returns (o: (B, H, T, Dv), final_state fp32 (B, H, Dk, Dv) or None). block: tokens per block."""
    o, final = _ChunkedLightning.apply(q, k, v, slope, initial_state, block)
    return o, (final if output_final_state else None)
