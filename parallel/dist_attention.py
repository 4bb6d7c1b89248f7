"""Distributed multi-head softmax attention over a cp group: Ulysses and ring attention.

Each of the W cp ranks holds a shard of the sequence: q (B, H, Tq/W, D), k, v (B, H, Tk/W, D); the result is
this rank's shard of o = softmax(q kᵀ · scale + mask) v over the WHOLE sequence.

- Ulysses (`UlyssesAttention`): one all_to_all_single turns sequence shards into head shards
  (B, H/W, T, D), attention runs locally on whole sequences, a second all-to-all turns the heads back into
  sequence shards. The backward of an all-to-all is the reverse all-to-all. Needs H divisible by W; shards
  are contiguous (rank r holds [r·C, (r+1)·C)), so the causal mask is the plain one after the exchange.
- `ulysses_deepspeed` (`DeepSpeedUlyssesAttention`): the same exchange done by DeepSpeed's
  `deepspeed.sequence.layer.DistributedAttention` (its all-to-alls and their backward) around our local
  attention, for runs that want DeepSpeed's implementation (and its comm/compute overlap on GPU streams).
- Ring (`RingAttention`): K/V blocks rotate around the ring (isend to r+1, irecv from r-1, overlapped with
  compute); each step yields a partial (o_j, lse_j) of q against block j, merged exactly by log-sum-exp:
      lse = log(e^lse_a + e^lse_b),   o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b.
  The backward is hand-written (FlashAttention's): with P = exp(q kᵀ·scale - lse) of the FINAL lse and
  Δ = rowsum(dO ⊙ O), per block  dV = Pᵀ dO,  dS = P ⊙ (dO Vᵀ - Δ),  dQ = dS K·scale,  dK = dSᵀ Q·scale;
  K/V rotate again and their gradients travel with them, arriving home after W hops.
  Layouts: "contiguous" (what LASP needs, so hybrids use it) or "zigzag" (rank r holds chunks r and 2W-1-r of
  2W, balancing the causal work: the softmax-only layout).

Which one a model uses is `parallel.attn_cp_impl`; `apply_dist_attention` installs it on every softmax
self-attention mixer (hybrid 'S' layers) and SharedLLM cross-attention of a model, beside LASP's
lightning-attention ops.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from model.softmax_attention import softmax_attention

IMPLS = ("ring", "ulysses", "ulysses_deepspeed")
LAYOUTS = ("contiguous", "zigzag")


def _process_group(group):
    """Accept a ProcessGroup or a 1-D DeviceMesh."""
    return group.get_group() if hasattr(group, "get_group") else group


# ---------------------------------------------------------------------------------------------- layouts

def zigzag_chunks(rank: int, world: int) -> tuple[int, int]:
    """The two of 2W equal chunks that rank r holds under the zig-zag split: (r, 2W-1-r)."""
    return rank, 2 * world - 1 - rank


def zigzag_shard(x: torch.Tensor, rank: int, world: int, dim: int) -> torch.Tensor:
    """This rank's zig-zag shard of a full tensor along `dim`: chunks r and 2W-1-r, concatenated."""
    chunks = x.chunk(2 * world, dim=dim)
    a, b = zigzag_chunks(rank, world)
    return torch.cat([chunks[a], chunks[b]], dim=dim)


def zigzag_positions(rank: int, world: int, local_T: int, device=None) -> torch.Tensor:
    """Global positions (local_T,) of a zig-zag shard (e.g. for RoPE)."""
    half = local_T // 2
    a, b = zigzag_chunks(rank, world)
    return torch.cat([torch.arange(a * half, (a + 1) * half, device=device),
                      torch.arange(b * half, (b + 1) * half, device=device)])


def _segments(rank: int, world: int, layout: str) -> list[int]:
    """Global ids of the equal segments a rank holds, in local order (units: the segment size)."""
    return [rank] if layout == "contiguous" else list(zigzag_chunks(rank, world))


# ---------------------------------------------------------------------------------------------- Ulysses

def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, C, D) sequence shard -> (B, H/W, W·C, D) head shard (rank w's chunk at [w·C, (w+1)·C))."""
    W = dist.get_world_size(group)
    B, H, C, D = x.shape
    send = x.reshape(B, W, H // W, C, D).transpose(0, 1).contiguous()  # piece w -> rank w
    recv = torch.empty_like(send)  # piece w <- rank w: its sequence chunk of my heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // W, W * C, D)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H/W, W·C, D) head shard -> (B, H, C, D) sequence shard: the inverse of `_seq_to_heads`."""
    W = dist.get_world_size(group)
    B, Hw, T, D = x.shape
    send = x.reshape(B, Hw, W, T // W, D).permute(2, 0, 1, 3, 4).contiguous()  # chunk w -> rank w
    recv = torch.empty_like(send)  # piece w <- rank w: my chunk of its heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(B, W * Hw, T // W, D)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group), None


class UlyssesAttention:
    """Softmax attention strategy over a cp group by head-sharding all-to-alls (contiguous shards).

    Same call as `LocalSoftmaxAttention`: q (B, H, Tq/W, D), k, v (B, H, Tk/W, D) -> (B, H, Tq/W, D).
    """

    def __init__(self, group):
        self.group = _process_group(group)
        self.world = dist.get_world_size(self.group)

    def check_heads(self, heads: int) -> None:
        if heads % self.world:
            raise ValueError(f"Ulysses attention: heads ({heads}) not divisible by cp ({self.world}); "
                             f"use parallel.attn_cp_impl=ring")

    def __call__(self, q, k, v, causal: bool = True, scale: float | None = None):
        self.check_heads(q.shape[1])
        qh, kh, vh = (_SeqToHeads.apply(x, self.group) for x in (q, k, v))
        return _HeadsToSeq.apply(softmax_attention(qh, kh, vh, causal, scale), self.group)

    def __repr__(self) -> str:
        return f"UlyssesAttention(cp={self.world})"


class DeepSpeedUlyssesAttention(UlyssesAttention):
    """Ulysses through DeepSpeed's `DistributedAttention` (layout (B, T, H, D): batch dim 0, sequence dim 1
    gathered, head dim 2 scattered); the local attention between the all-to-alls is ours. Same call and
    results as `UlyssesAttention`."""

    def __init__(self, group):
        super().__init__(group)
        try:
            from deepspeed.sequence.layer import DistributedAttention
        except ImportError as e:
            raise ImportError("parallel.attn_cp_impl=ulysses_deepspeed needs DeepSpeed: pip install deepspeed "
                              "(or the project's `deepspeed` extra), or use attn_cp_impl=ulysses") from e
        from parallel.data_parallel import init_deepspeed_comm

        init_deepspeed_comm()  # DistributedAttention talks through deepspeed.comm

        def local(q, k, v, causal, scale):  # (B, T, H/W, D) whole sequences, this rank's heads
            o = softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale)
            return o.transpose(1, 2)

        self.op = DistributedAttention(local, self.group, scatter_idx=2, gather_idx=1)

    def __call__(self, q, k, v, causal: bool = True, scale: float | None = None):
        self.check_heads(q.shape[1])
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        return self.op(q, k, v, 0, None, causal, scale).transpose(1, 2)

    def __repr__(self) -> str:
        return f"DeepSpeedUlyssesAttention(cp={self.world})"


# ---------------------------------------------------------------------------------------------- ring

def _block_scores(q, k, scale, kind):
    """Scores (B, H, Tq, Tk) in the compute dtype; kind 'causal' masks s > t (a diagonal block)."""
    s = (q @ k.transpose(-1, -2)) * scale
    if kind == "causal":
        t = s.shape[-1]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _block_kind(q_seg: int, k_seg: int, causal: bool) -> str | None:
    if not causal or k_seg < q_seg:
        return "full"
    return "causal" if k_seg == q_seg else None


def _ring_pass(tensors, group):
    """Start sending `tensors` to rank r+1 and receiving the same shapes from r-1; returns (recvd, waiter)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    tensors = [t.contiguous() for t in tensors]
    recvd = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, recvd):
        ops.append(dist.P2POp(dist.isend, t, group=group, group_peer=(rank + 1) % world))
        ops.append(dist.P2POp(dist.irecv, r, group=group, group_peer=(rank - 1) % world))
    reqs = dist.batch_isend_irecv(ops)

    def wait():
        for req in reqs:
            req.wait()
        return recvd

    return wait


def _split(x, n):
    return list(x.chunk(n, dim=2)) if n > 1 else [x]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, layout, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32  # merge and accumulate in fp32+
        qc = q.to(ct)
        q_segs = _segments(rank, world, layout)
        qs = _split(qc, len(q_segs))
        outs = [torch.zeros(*x.shape[:-1], v.shape[-1], dtype=ct, device=q.device) for x in qs]
        lses = [torch.full(x.shape[:-1], float("-inf"), dtype=ct, device=q.device) for x in qs]
        kv = (k, v)
        for step in range(world):
            wait = _ring_pass(kv, group) if step < world - 1 else None
            src = (rank - step) % world
            k_segs = _segments(src, world, layout)
            ks, vs = _split(kv[0].to(ct), len(k_segs)), _split(kv[1].to(ct), len(k_segs))
            for i, qi in enumerate(qs):
                for j, (kj, vj) in enumerate(zip(ks, vs)):
                    kind = _block_kind(q_segs[i], k_segs[j], causal)
                    if kind is None:
                        continue
                    s = _block_scores(qi, kj, scale, kind)
                    lse_b = torch.logsumexp(s, dim=-1)
                    o_b = torch.exp(s - lse_b.unsqueeze(-1)) @ vj
                    lse = torch.logaddexp(lses[i], lse_b)
                    outs[i] = (torch.exp(lses[i] - lse).unsqueeze(-1) * outs[i]
                               + torch.exp(lse_b - lse).unsqueeze(-1) * o_b)
                    lses[i] = lse
            if wait is not None:
                kv = tuple(wait())
        out = torch.cat(outs, dim=2)
        lse = torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.layout, ctx.group = causal, scale, layout, group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, scale, layout = ctx.group, ctx.causal, ctx.scale, ctx.layout
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ct = out.dtype
        do = do.to(ct)
        delta = (do * out).sum(-1)  # Δ = rowsum(dO ⊙ O), (B, H, Tq)
        q_segs = _segments(rank, world, layout)
        n_q = len(q_segs)
        qs, dos, lses, deltas = (_split(x, n_q) for x in (q.to(ct), do, lse.unsqueeze(-1), delta.unsqueeze(-1)))
        dqs = [torch.zeros_like(x) for x in qs]
        k_cur, v_cur = k, v
        dk_cur = torch.zeros(k.shape, dtype=ct, device=k.device)
        dv_cur = torch.zeros(v.shape, dtype=ct, device=v.device)
        for step in range(world):
            src = (rank - step) % world
            k_segs = _segments(src, world, layout)
            n_k = len(k_segs)
            ks, vs = _split(k_cur.to(ct), n_k), _split(v_cur.to(ct), n_k)
            dks, dvs = _split(dk_cur, n_k), _split(dv_cur, n_k)
            for i in range(n_q):
                for j in range(n_k):
                    kind = _block_kind(q_segs[i], k_segs[j], causal)
                    if kind is None:
                        continue
                    p = torch.exp(_block_scores(qs[i], ks[j], scale, kind) - lses[i])
                    dvs[j] += p.transpose(-1, -2) @ dos[i]
                    ds = p * (dos[i] @ vs[j].transpose(-1, -2) - deltas[i])
                    dqs[i] += (ds @ ks[j]) * scale
                    dks[j] += (ds.transpose(-1, -2) @ qs[i]) * scale
            dk_cur, dv_cur = torch.cat(dks, dim=2), torch.cat(dvs, dim=2)
            # gradients travel with their block; after W hops each block's gradient is home
            wait = _ring_pass((k_cur, v_cur, dk_cur, dv_cur) if step < world - 1 else (dk_cur, dv_cur), group)
            got = wait()
            if step < world - 1:
                k_cur, v_cur, dk_cur, dv_cur = got
            else:
                dk_cur, dv_cur = got
        dq = torch.cat(dqs, dim=2)
        return dq.to(q.dtype), dk_cur.to(k.dtype), dv_cur.to(v.dtype), None, None, None, None


class RingAttention:
    """Softmax attention strategy over a cp group by rotating K/V blocks (exact log-sum-exp merge).

    Same call as `LocalSoftmaxAttention`: q (B, H, Tq/W, D), k, v (B, H, Tk/W, D) -> (B, H, Tq/W, D), each
    shard in `layout` order (causal needs Tq == Tk; zig-zag needs an even local length).
    """

    def __init__(self, group, layout: str = "contiguous"):
        if layout not in LAYOUTS:
            raise ValueError(f"ring attention layout must be one of {LAYOUTS}, got {layout!r}")
        self.group, self.layout = _process_group(group), layout
        self.world = dist.get_world_size(self.group)

    def __call__(self, q, k, v, causal: bool = True, scale: float | None = None):
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(f"causal ring attention needs equal q and k shards, got {q.shape[2]} and {k.shape[2]}")
        if self.layout == "zigzag" and (q.shape[2] % 2 or k.shape[2] % 2):
            raise ValueError(f"zig-zag shards hold two equal chunks: local lengths {q.shape[2]}, {k.shape[2]} "
                             f"must be even")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _RingAttention.apply(q, k, v, causal, scale, self.layout, self.group)

    def __repr__(self) -> str:
        return f"RingAttention(layout={self.layout!r}, cp={self.world})"


def build_dist_attention(group, impl: str = "ring", layout: str = "contiguous"):
    if impl not in IMPLS:
        raise ValueError(f"parallel.attn_cp_impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl in ("ulysses", "ulysses_deepspeed"):
        if layout != "contiguous":
            raise ValueError("Ulysses attention takes contiguous sequence shards (layout='contiguous')")
        return UlyssesAttention(group) if impl == "ulysses" else DeepSpeedUlyssesAttention(group)
    return RingAttention(group, layout)


def apply_dist_attention(model, cp_group, impl: str = "ring", layout: str = "contiguous", extra_types=()):
    """Install distributed MHA on every softmax attention of `model` (in place; returns model).

    Covers every `SoftmaxMixer` (hybrid S layers, the Llama baseline) and modules of `extra_types` with the same
    `attn_op` strategy slot (an architecture spec adds its cross-attention, whose memory then spreads over the
    cp ranks). Lightning layers are left to `parallel.lasp.apply_lasp`; with both in one model the layout must
    be contiguous (LASP's). Ulysses checks the heads up front.
    """
    from model.softmax_attention import SoftmaxMixer

    op = build_dist_attention(_process_group(cp_group), impl, layout)
    targets = [m for m in model.modules() if isinstance(m, (SoftmaxMixer, *extra_types))]
    for m in targets:
        if impl != "ring":
            op.check_heads(m.heads)
        m.attn_op = op
    return model
