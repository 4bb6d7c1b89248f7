"""Public API of lightning attention: argument checks and backend dispatch.

Per head h with decay λ_h = exp(-slope_h) and the state convention used by every backend

    S_t = λ^{t+1} S_in + Σ_{s≤t} λ^{t-s} k_sᵀ v_s        (t = 0 .. T-1, S_in the initial state)
    o_t = q_t S_t
    final_state = S_{T-1}

so that running T1 tokens, then T2 tokens starting from the first call's final state, equals one call
over T1 + T2 tokens. Equivalently S = λS + kᵀv, o = qS token by token. No 1/sqrt(d) scale.

Shapes: q, k (B, H, T, Dk); v (B, H, T, Dv); slope (H,); states (B, H, Dk, Dv).
The state and all accumulation are fp32 (fp64 when the inputs are fp64); o has the input dtype.
Gradients flow to q, k, v and the initial state; the chunked and triton backends give slope none (TNL's
decays are fixed buffers).
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "naive", "recurrent", "chunked", "triton")


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), got {x.dtype}")


def check_inputs(q, k, v, slope, state, state_name: str = "initial_state") -> None:
    """Raise ValueError naming the bad argument. q, k: (B, H, T, Dk); v: (B, H, T, Dv); slope: (H,)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("slope", slope)):
        _check_float(name, x)
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, T, Dk), got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    B, H, T, Dk = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, H, T, Dv) = ({B}, {H}, {T}, Dv), got shape {tuple(v.shape)}")
    if T < 1:
        raise ValueError(f"q must hold at least one token (T >= 1), got T={T}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if slope.shape != (H,):
        raise ValueError(f"slope must be (H,) = ({H},), got shape {tuple(slope.shape)}")
    # a value check reads the tensor: on CPU only (on a GPU it would synchronise every layer), never when compiled
    if slope.device.type == "cpu" and not torch.compiler.is_compiling() and (
            not bool((slope > 0).all()) or not bool(torch.isfinite(slope).all())):
        raise ValueError(f"slope must be finite and positive (decay exp(-slope) < 1), got {slope.tolist()}")
    for name, x in (("k", k), ("v", v), ("slope", slope)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if state is not None:
        _check_float(state_name, state)
        want = (B, H, Dk, v.shape[-1])
        if tuple(state.shape) != want:
            raise ValueError(f"{state_name} must be (B, H, Dk, Dv) = {want}, got shape {tuple(state.shape)}")
        if state.device != q.device:
            raise ValueError(f"{state_name} is on {state.device} but q is on {q.device}")


def _triton_usable(x: torch.Tensor) -> bool:
    if not x.is_cuda or x.dtype == torch.float64:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def lightning_attn(q, k, v, slope, initial_state=None, output_final_state=False, backend="auto"):
    """o_t = q_t S_t with S_t = λ S_{t-1} + k_tᵀ v_t (see the module docstring).

    q, k: (B, H, T, Dk); v: (B, H, T, Dv); slope: (H,) > 0; initial_state: (B, H, Dk, Dv) or None.
    Returns (o: (B, H, T, Dv) in q's dtype, final_state: fp32 (B, H, Dk, Dv) or None unless asked).
    backend: "auto" (triton on CUDA when importable, chunked elsewhere), "naive", "recurrent",
    "chunked" or "triton".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(q, k, v, slope, initial_state)
    if backend == "auto":
        backend = "triton" if _triton_usable(q) else "chunked"
    if backend == "naive":
        from model.ops.naive import naive_attn as fn
    elif backend == "recurrent":
        from model.ops.recurrent import recurrent_attn as fn
    elif backend == "chunked":
        from model.ops.chunked import chunked_attn as fn
    else:
        from model.ops.triton_backend import triton_attn as fn
    return fn(q, k, v, slope, initial_state, output_final_state)


def lightning_attn_step(q, k, v, slope, state):
    """One decoding token: new_state = λ state + kᵀ v, o = q new_state.

    q, k: (B, H, Dk) or (B, H, 1, Dk); v: (B, H, Dv) or (B, H, 1, Dv); slope: (H,);
    state: (B, H, Dk, Dv) (fp32; None means zeros). Returns (o shaped like v, new_state fp32).
    An fp32 state rounds away per-token decays within one ulp of 1 (slope below ~6e-8); pass an fp64
    state to keep it exact, and it stays fp64.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
        if x.dim() not in (3, 4) or (x.dim() == 4 and x.shape[2] != 1):
            raise ValueError(f"{name} must be (B, H, D) or (B, H, 1, D) for one token, got shape {tuple(x.shape)}")
    squeeze = q.dim() == 3
    q4, k4, v4 = (x.unsqueeze(2) if x.dim() == 3 else x for x in (q, k, v))
    check_inputs(q4, k4, v4, slope, state, state_name="state")
    from model.ops.recurrent import recurrent_attn

    o, new_state = recurrent_attn(q4, k4, v4, slope, state, True)
    return (o.squeeze(2) if squeeze else o), new_state
