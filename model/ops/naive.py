"""Naive lightning attention: the quadratic, masked oracle every other backend is tested against.

    o_t = Σ_{s≤t} λ^{t-s} (q_t·k_s) v_s + λ^{t+1} q_t S_in
    final_state = λ^T S_in + Σ_s λ^{T-1-s} k_sᵀ v_s

with λ = exp(-slope) per head. Shapes as in ``model/ops/lightning.py``. Costs O(T² D) time and O(T²) memory.
Autograd provides the gradients (to q, k, v and S_in).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_attn(q, k, v, slope, initial_state=None, output_final_state=False):
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv); slope: (H,); initial_state: (B, H, Dk, Dv) or None."""
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    T = q.shape[2]
    s = slope.to(ct).view(-1, 1, 1)  # (H, 1, 1)
    t = torch.arange(T, device=q.device, dtype=ct)
    dist = t.view(-1, 1) - t.view(1, -1)  # (T, T): t - s
    # mask before exp so the upper triangle is exp(-inf) = 0, never exp(+large)
    decay = torch.exp(-s * dist.masked_fill(dist < 0, float("inf")))  # (H, T, T)
    o = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
    final = None
    if output_final_state:
        kdec = torch.exp(-s * (T - 1 - t).view(1, -1, 1))  # (H, T, 1): λ^{T-1-s}
        final = (kc * kdec).transpose(-1, -2) @ vc
    if initial_state is not None:
        s_in = initial_state.to(ct)
        qdec = torch.exp(-s * (t + 1).view(1, -1, 1))  # (H, T, 1): λ^{t+1}
        o = o + (qc * qdec) @ s_in
        if output_final_state:
            final = final + torch.exp(-s * T) * s_in
    return o.to(q.dtype), final
