"""Recurrent lightning attention: one token at a time, S = λS + k_tᵀ v_t, o_t = q_t S.

The numerically robust form (only multiplies by λ ≤ 1) and the decoding path. O(T Dk Dv) time, a Python loop
over T, autograd for the gradients: use it for decoding and as a second oracle, not for training.
Shapes as in ``model/ops/lightning.py``.

The loop carries the state in float64: for the last layers' slopes (~1e-5·s_h, down to ~4e-8) λ lies within
one fp32 ulp of 1, so an fp32 state would round the per-token decay away and drift by ~T·3e-8 relative.
The returned state is fp32 (fp64 for fp64 inputs or an fp64 initial state).
"""

from __future__ import annotations

import torch

from model.ops.naive import compute_dtype


def recurrent_attn(q, k, v, slope, initial_state=None, output_final_state=False):
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv); slope: (H,); initial_state: (B, H, Dk, Dv) or None."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    acc = torch.float64
    lam = torch.exp(-slope.to(acc)).view(1, H, 1, 1)
    if initial_state is None:
        S = torch.zeros(B, H, Dk, Dv, device=q.device, dtype=acc)
        out_dtype = compute_dtype(q.dtype)
    else:
        S = initial_state.to(acc)
        out_dtype = torch.promote_types(compute_dtype(q.dtype), initial_state.dtype)
    # unbind once: indexing [:, :, t] in the loop would make autograd's backward O(T²)
    qs, ks, vs = (x.to(acc).unbind(2) for x in (q, k, v))
    outs = []
    # elementwise products and sums, not matmul: a tiny batched fp64 bmm per token costs milliseconds when
    # the BLAS thread pool is oversubscribed
    for q_t, k_t, v_t in zip(qs, ks, vs):
        S = torch.addcmul(lam * S, k_t[..., :, None], v_t[..., None, :])
        outs.append((q_t[..., :, None] * S).sum(-2))
    o = torch.stack(outs, dim=2).to(q.dtype)
    return o, (S.to(out_dtype) if output_final_state else None)
