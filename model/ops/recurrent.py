"""Recurrent lightning attention: one token at a time, S = λS + k_tᵀ v_t, o_t = q_t S.

The numerically robust form (only multiplies by λ ≤ 1) and the decoding path. O(T Dk Dv) time, a Python loop
over T, autograd for the gradients: use it for decoding and as a second oracle, not for training.
Shapes as in ``model/ops/lightning.py``.
"""

from __future__ import annotations

import torch

from model.ops.naive import compute_dtype


def recurrent_attn(q, k, v, slope, initial_state=None, output_final_state=False):
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv); slope: (H,); initial_state: (B, H, Dk, Dv) or None."""
    ct = compute_dtype(q.dtype)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    lam = torch.exp(-slope.to(ct)).view(1, H, 1, 1)
    if initial_state is None:
        S = torch.zeros(B, H, Dk, Dv, device=q.device, dtype=ct)
    else:
        S = initial_state.to(ct)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    outs = []
    for t in range(T):
        S = lam * S + kc[:, :, t, :, None] * vc[:, :, t, None, :]
        outs.append((qc[:, :, t, None, :] @ S).squeeze(-2))
    o = torch.stack(outs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)
