"""Softmax attention shared by the models: the local op, its strategy object, and the RoPE self-attention mixer.

    o = softmax(q kᵀ · scale + mask) v        q: (B, H, Tq, D); k, v: (B, H, Tk, D); scale = 1/sqrt(D)

The causal mask is the square one (Tq == Tk, query t sees keys s <= t); cross-attention (q from one
sequence, k/v from a memory) is not causal. On CUDA with flash-attn installed and fp16/bf16 inputs the op
calls `flash_attn_func` / `flash_attn_varlen_func`; everywhere else `F.scaled_dot_product_attention` (and a
loop over segments for varlen). Both compute the same function.

Like `TokenMixer.attn_op`, `SoftmaxMixer.attn_op` is a strategy object with the `LocalSoftmaxAttention`
call; `parallel.dist_attention` installs a distributed one (Ulysses or ring) under sequence parallelism.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

try:  # optional: the GPU path
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - CPU machines
    flash_attn_func = flash_attn_varlen_func = None


def _use_flash(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def softmax_attention(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """q: (B, H, Tq, D); k, v: (B, H, Tk, D) -> (B, H, Tq, D). causal needs Tq == Tk."""
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    if _use_flash(q):
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                            softmax_scale=scale)
        return o.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def softmax_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = False,
                             scale: float | None = None) -> torch.Tensor:
    """Packed sequences: q (Nq, H, D), k/v (Nk, H, D); segment i is rows cu[i]:cu[i+1]. Returns (Nq, H, D).

    Segment i of q attends only to segment i of k/v (cu_seqlens: int32 (S+1,), starting at 0).
    """
    if _use_flash(q):
        lq, lk = cu_seqlens_q.diff(), cu_seqlens_k.diff()
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), int(lq.max()), int(lk.max()),
                                      causal=causal, softmax_scale=scale)
    out = []
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bq) - 1):
        sq, sk = slice(bq[i], bq[i + 1]), slice(bk[i], bk[i + 1])
        qi, ki, vi = (x.transpose(0, 1).unsqueeze(0) for x in (q[sq], k[sk], v[sk]))
        out.append(softmax_attention(qi, ki, vi, causal, scale)[0].transpose(0, 1))
    return torch.cat(out, dim=0)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (HF Llama rotate-half convention) at `positions` (T,) or (1,) for x (B, H, T, hd).

    Angles in fp32 or better (fp64 inputs stay fp64, so float64 checks are exact).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=dtype, device=x.device) / hd)
    angles = positions.to(device=x.device, dtype=dtype)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class LocalSoftmaxAttention:
    """The default softmax attention strategy: the whole sequence (and memory) is on this process."""

    def __call__(self, q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
        return softmax_attention(q, k, v, causal, scale)

    def __repr__(self) -> str:
        return "LocalSoftmaxAttention()"


class SoftmaxMixer(nn.Module):
    """The token mixer of a hybrid's softmax ('S') layer: RoPE causal self-attention, Llama-style.

    x: (B, T, D) -> (B, T, D). Same call as the lightning `TokenMixer`; positions start at `position_offset`
    (the global start of a sequence shard). Its "state" is a key/value cache, so a hybrid decodes with states
    like a pure TNL (lightning layers carry (B, H, Dk, Dv), softmax layers (k, v) growing by one per token).
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.heads, self.head_dim, self.theta = cfg.heads, cfg.head_dim, cfg.rope_theta
        hidden = cfg.heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.k_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.v_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, cfg.dim, bias=False)
        self.attn_op = LocalSoftmaxAttention()

    def forward(self, x, position_offset: int = 0, state=None, return_state: bool = False):
        """state: a key/value cache (k, v), each (B, H, P, hd) after RoPE, of the P tokens before this call
        (what `return_state=True` returns, extended by this call's tokens): decoding a hybrid step by step."""
        b, t, _ = x.shape
        q, k, v = (p(x).reshape(b, t, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        positions = torch.arange(position_offset, position_offset + t, device=x.device)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        if state is None:
            o = self.attn_op(q, k, v, causal=True)
        else:
            if not isinstance(self.attn_op, LocalSoftmaxAttention):
                raise NotImplementedError("a key/value cache is for local decoding, not under sequence parallelism")
            k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
            past = k.shape[2] - t  # query i sees the cache and new keys up to itself: j <= past + i
            allowed = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        return (y, (k, v)) if return_state else y
