"""LASP: sequence (context) parallelism for lightning attention, contiguous chunks.

The cp group of W ranks splits a sequence of T = W·C tokens into contiguous chunks: rank r holds tokens
[r·C, (r+1)·C) (never the zig-zag split of softmax ring attention: the recurrence runs left to right).
Per head, λ = exp(-slope), the standard state convention of `model/ops` (S_t = λ S_{t-1} + k_tᵀ v_t).

    S_loc(r) = Σ_{s<C} λ^{C-1-s} k_sᵀ v_s                       this rank's chunk alone, from a zero state
    S_in(r)  = Σ_{j<r} λ^{(r-1-j)·C} S_loc(j)  (+ λ^{r·C} S_0)   the state entering chunk r
    o, G_r   = lightning_attn(q, k, v, slope, initial_state=S_in(r))   (G_r: the state after chunk r)

S_loc is one (B, H, C, Dk)ᵀ(B, H, C, Dv) matmul (the LASP-2 "memory state"), so the op runs once, with the
initial state; its gradient d(initial_state) = dS_in(r) is all the backward needs:

    dS_loc(r) = Σ_{j>r} λ^{(j-1-r)·C} dS_in(j)                  (decayed suffix sum)

and the local autograd graph of S_loc turns dS_loc into the cross-chunk part of dk, dv.
What crosses ranks is only the fp32 state (B, H, Dk, Dv) (fp64 for fp64 inputs), independent of C.

- LASP-2 (`impl="lasp2"`): forward one all-gather of the W local states, each rank forms its prefix;
  backward one all-gather of dS_in, each rank forms its suffix. No wavefront: ranks never wait on each other
  beyond the collective.
- LASP-1 (`impl="lasp1"`): the ring. Forward: receive G_{r-1} from rank r-1, send G_r = λ^C S_in + S_loc to
  rank r+1; backward: the reverse ring carries dG_r = dS_in(r+1) + λ^C dG_{r+1}. W-1 sequential hops: kept
  as a check of LASP-2.

Contract (the strategy object replaces `TokenMixer.attn_op`; the model module stays plain):
- every cp rank holds the same C (the loader splits power-of-two lengths evenly) and calls the model with
  `position_offset=cp_position_offset(cp_rank, C)` so LRPE sees global positions;
- `initial_state`, when given, is the state before token 0 of the whole sequence and must be identical on
  every cp rank; its gradient comes back as this rank's share λ^{r·C} dS_in(r), which sums over the cp group
  to the full gradient (the same convention as the replicated parameters, whose grads are summed over cp);
- `output_final_state=True` returns G_r, the state after this rank's chunk: the sequence's final state on
  the last cp rank.
"""
from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from model.ops import lightning_attn
from model.ops.naive import compute_dtype

IMPLS = ("lasp2", "lasp1")


def cp_position_offset(cp_rank: int, local_T: int) -> int:
    """Global position of this rank's first token (contiguous chunks of local_T tokens)."""
    return cp_rank * local_T


def _process_group(group):
    """Accept a ProcessGroup or a 1-D DeviceMesh."""
    return group.get_group() if hasattr(group, "get_group") else group


def _decay(slope: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """λ^n per head, shaped (1, H, 1, 1) to scale (B, H, Dk, Dv) states."""
    return torch.exp(-slope.to(dtype) * n).view(1, -1, 1, 1)


def local_state(k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """S_loc = Σ_s λ^{C-1-s} k_sᵀ v_s from a zero state. k: (B, H, C, Dk); v: (B, H, C, Dv) -> (B, H, Dk, Dv)."""
    ct = compute_dtype(k.dtype)
    C = k.shape[2]
    s = torch.arange(C - 1, -1, -1, device=k.device, dtype=ct)  # C-1-s
    kd = torch.exp(-slope.to(ct).view(-1, 1, 1) * s.view(1, -1, 1))  # (H, C, 1); only multiplies by λ <= 1
    with torch.autocast(k.device.type, enabled=False):  # the state stays fp32 under bf16 autocast
        return (k.to(ct) * kd).transpose(-1, -2) @ v.to(ct)


# torch 2.13 renamed all_gather_into_tensor to all_gather_single (same call); looked up at call time so a
# benchmark can wrap it to count bytes.
def _ALL_GATHER(out, x, group):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """(...) -> (W, ...) in group-rank order, one collective."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # concatenated along dim 0, as gloo and NCCL want
    _ALL_GATHER(out, x, group=group)
    return out.view(world, *x.shape)


class _Lasp2Exchange(torch.autograd.Function):
    """S_loc(r) -> S_in(r) = Σ_{j<r} λ^{(r-1-j)C} S_loc(j): all-gather forward, all-gather of dS_in backward."""

    @staticmethod
    def forward(ctx, s_loc, slope, C, group, replay=None):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        lam_c = _decay(slope, C, s_loc.dtype)
        ctx.lam_c, ctx.rank, ctx.world, ctx.group = lam_c, rank, world, group
        if replay is not None:  # an activation-checkpoint recomputation: the state this rank received before
            return replay.clone()
        states = _all_gather(s_loc, group)
        s_in = torch.zeros_like(s_loc)
        for j in range(rank):  # Horner: s_in = S(r-1) + λ^C (S(r-2) + λ^C (...))
            s_in = lam_c * s_in + states[j]
        return s_in

    @staticmethod
    def backward(ctx, ds_in):
        grads = _all_gather(ds_in, ctx.group)
        ds_loc = torch.zeros_like(ds_in)
        for j in range(ctx.world - 1, ctx.rank, -1):
            ds_loc = ctx.lam_c * ds_loc + grads[j]
        return ds_loc, None, None, None, None


class _Lasp1Exchange(torch.autograd.Function):
    """The same map as _Lasp2Exchange over a ring: recv G_{r-1}, send G_r; backward the reverse ring."""

    @staticmethod
    def forward(ctx, s_loc, slope, C, group, replay=None):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        lam_c = _decay(slope, C, s_loc.dtype)
        ctx.lam_c, ctx.rank, ctx.world, ctx.group = lam_c, rank, world, group
        if replay is not None:  # recomputation: no ring hop (every rank replays its own state)
            return replay.clone()
        s_in = torch.zeros_like(s_loc)
        if rank > 0:
            dist.recv(s_in, group=group, group_src=rank - 1)
        if rank < world - 1:
            dist.send((lam_c * s_in + s_loc).contiguous(), group=group, group_dst=rank + 1)
        return s_in

    @staticmethod
    def backward(ctx, ds_in):
        d_next = torch.zeros_like(ds_in)  # dG_r: the gradient of the state this rank sent forward
        if ctx.rank < ctx.world - 1:
            dist.recv(d_next, group=ctx.group, group_src=ctx.rank + 1)
        if ctx.rank > 0:
            dist.send((ds_in + ctx.lam_c * d_next).contiguous(), group=ctx.group, group_dst=ctx.rank - 1)
        return d_next, None, None, None, None


class LaspAttention:
    """`TokenMixer.attn_op` strategy: lightning attention over a sequence sharded across a cp group.

    Same call as `lightning_attn` on this rank's chunk: q, k (B, H, C, Dk); v (B, H, C, Dv); slope (H,).
    Returns (o (B, H, C, Dv), G_r or None). See the module docstring for initial/final state semantics.
    """

    def __init__(self, group, impl: str = "lasp2", backend: str = "auto"):
        if impl not in IMPLS:
            raise ValueError(f"LASP impl must be one of {IMPLS}, got {impl!r}")
        self.group = _process_group(group)
        self.impl, self.backend = impl, backend
        self._exchange = _Lasp2Exchange if impl == "lasp2" else _Lasp1Exchange
        self._stash: collections.deque = collections.deque()  # states received under activation checkpointing

    def __call__(self, q, k, v, slope, initial_state=None, output_final_state=False):
        C = q.shape[2]
        s_loc = local_state(k, v, slope)
        from parallel.activation_checkpoint import mode

        ac = mode()
        if ac is None:
            s_in = self._exchange.apply(s_loc, slope, C, self.group)
        else:  # checkpointed: outside selective AC's op tracking, so forward and recomputation stay alike
            from torch.utils._python_dispatch import _disable_current_modes

            replay = self._stash.popleft() if ac == "replay" and self._stash else None
            with _disable_current_modes():
                s_in = self._exchange.apply(s_loc, slope, C, self.group, replay)
            if ac == "save":
                self._stash.append(s_in.detach())
        if initial_state is not None:
            rank = dist.get_rank(self.group)
            s_in = s_in + _decay(slope, rank * C, s_in.dtype) * initial_state.to(s_in.dtype)
        return lightning_attn(q, k, v, slope, initial_state=s_in, output_final_state=output_final_state,
                              backend=self.backend)

    def __repr__(self) -> str:
        return f"LaspAttention(impl={self.impl!r}, backend={self.backend!r}, cp={dist.get_world_size(self.group)})"


def apply_lasp(model, cp_group, impl: str = "lasp2"):
    """Install LaspAttention on every lightning-attention TokenMixer of `model` (in place; returns model).

    Each mixer keeps its op backend. Softmax layers (hybrid models) are left to distributed MHA.
    The caller passes `position_offset=cp_position_offset(cp_rank, C)` to `model.forward`.
    """
    from model.tnl import TokenMixer

    if impl not in IMPLS:
        raise ValueError(f"parallel.cp_impl must be one of {IMPLS}, got {impl!r}")
    group = _process_group(cp_group)
    for module in model.modules():
        if isinstance(module, TokenMixer):
            module.attn_op = LaspAttention(group, impl, backend=getattr(module.attn_op, "backend", "auto"))
    return model
