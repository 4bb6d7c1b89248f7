"""Triton lightning attention: the autograd wrapper around ``model/ops/triton_kernels.py`` (the GPU path).

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before this module
is first imported) which is how CI tests the exact kernel code. Inputs fp32 / bf16 / fp16; fp32 state and
accumulation. Shapes as in ``model/ops/lightning.py``. No gradient flows to slope.
"""

from __future__ import annotations

import os

import torch
import triton

from model.ops.triton_kernels import lightning_bwd_dkv_kernel, lightning_bwd_dq_kernel, lightning_fwd_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _config(Dk: int, Dv: int, T: int):
    """(BLOCK, DKP, BV, NV, launch options): tokens per block, padded Dk, Dv slice width, number of Dv slices,
    num_warps / num_stages. Wide heads get narrower Dv slices and shorter blocks so the (DKP, BV) state and the
    (BLOCK, DKP) q/k tiles fit; past DKP 64 the loads are not software-pipelined (num_stages 1), which halves
    shared memory: compiled for sm_90 the fp32 dk/dv kernel needs 256 KiB at DKP 128 with 3 stages (over the
    H100's 227 KiB), 112 KiB with 1."""
    DKP = max(16, triton.next_power_of_2(Dk))
    wide = DKP > 128
    BV = min(32 if wide else 64, max(16, triton.next_power_of_2(Dv)))
    block = min(32 if wide else 64, max(16, triton.next_power_of_2(T)))
    launch = {"num_warps": 8 if DKP >= 128 else 4, "num_stages": 3 if DKP <= 64 else 1}
    return block, DKP, BV, triton.cdiv(Dv, BV), launch


class _TritonLightning(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, s_in, output_final_state):
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        BLOCK, DKP, BV, NV, launch = _config(Dk, Dv, T)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        slope32 = slope.to(torch.float32).contiguous()
        s_in32 = None if s_in is None else s_in.to(torch.float32).contiguous()
        o = torch.empty_like(v)
        s_out = torch.empty(B, H, Dk, Dv, device=q.device, dtype=torch.float32)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        lightning_fwd_kernel[(B * H, NV)](
            q, k, v, o, s_in32 if s_in32 is not None else s_out, s_out, slope32, T, H, triton.cdiv(T, BLOCK),
            Dk, Dv, HAS_S_IN=s_in32 is not None, STORE_S_OUT=bool(output_final_state), PREC=prec,
            BLOCK=BLOCK, DKP=DKP, BV=BV, **launch)
        ctx.save_for_backward(q, k, v, slope32, s_in32)
        ctx.set_materialize_grads(False)  # an unused final state then costs no zero-filled gradient
        ctx.has_s_in = s_in is not None
        ctx.s_in_dtype = None if s_in is None else s_in.dtype
        return o, s_out  # s_out is left unwritten unless output_final_state; triton_attn then drops it

    @staticmethod
    def backward(ctx, do, dfinal):
        if do is None:
            do = torch.zeros_like(ctx.saved_tensors[2])
        q, k, v, slope32, s_in32 = ctx.saved_tensors
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        BLOCK, DKP, BV, NV, launch = _config(Dk, Dv, T)
        NB = triton.cdiv(T, BLOCK)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        do = do.contiguous()
        dq_part = torch.empty(NV, B * H, T, Dk, device=q.device, dtype=torch.float32)
        dk_part = torch.empty_like(dq_part)
        dv = torch.empty_like(v)
        ds_in = torch.empty(B, H, Dk, Dv, device=q.device, dtype=torch.float32)
        dfinal = None if dfinal is None else dfinal.to(torch.float32).contiguous()
        lightning_bwd_dq_kernel[(B * H, NV)](
            k, v, do, dq_part, s_in32 if s_in32 is not None else ds_in, slope32, T, H, NB, Dk, Dv, B * H,
            HAS_S_IN=s_in32 is not None, PREC=prec, BLOCK=BLOCK, DKP=DKP, BV=BV, **launch)
        lightning_bwd_dkv_kernel[(B * H, NV)](
            q, k, v, do, dk_part, dv, dfinal if dfinal is not None else ds_in, ds_in, slope32, T, H, NB, Dk, Dv,
            B * H, HAS_DS_OUT=dfinal is not None, STORE_DS_IN=ctx.has_s_in, PREC=prec,
            BLOCK=BLOCK, DKP=DKP, BV=BV, **launch)
        dq = dq_part.sum(0).view(B, H, T, Dk).to(q.dtype)
        dk = dk_part.sum(0).view(B, H, T, Dk).to(k.dtype)
        ds = ds_in.to(ctx.s_in_dtype) if ctx.has_s_in else None
        return dq, dk, dv, None, ds, None


def triton_attn(q, k, v, slope, initial_state=None, output_final_state=False):
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv); slope: (H,); initial_state: (B, H, Dk, Dv) or None."""
    if q.dtype not in SUPPORTED:
        raise ValueError(f"triton backend supports q/k/v dtypes {SUPPORTED}, got {q.dtype}; use backend='chunked'")
    if not q.is_cuda and not INTERPRET:
        raise ValueError(f"triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {q.device}")
    o, final = _TritonLightning.apply(q, k, v, slope, initial_state, output_final_state)
    return o, (final if output_final_state else None)
