"""Megatron tensor parallelism for the TNL decoder, applied from outside with DTensor `parallelize_module`.

Per block, over the tp mesh of size p (Megatron's notation, Y = X A):
- `qkvu_proj` is column-parallel by heads. Its output is four blocks [Q|K|V|U], each H*hd wide, so a plain
  Shard(0) of the (4*H*hd, D) weight would hand rank 0 all of Q and K. We shard it with
  `_StridedShard(0, split_factor=4)`: the rows are cut into 4*p equal pieces and rank r holds pieces
  r, r+p, r+2p, r+3p, i.e. [Q_r|K_r|V_r|U_r] with Q_r the heads [r*H/p, (r+1)*H/p). The module's own
  `chunk(4)` then splits the local output correctly, and `full_tensor()` / the state dict hold the very same
  (4*H*hd, D) matrix as the unsharded model, so checkpoints do not depend on the layout (no reordering).
- the decay slopes (buffer, not in the state dict) are sliced to the local heads; LRPE's theta (H, 1, hd) is
  a Shard(0) DTensor parameter computed on the local heads.
- the attention-output SRMSNorm spans all heads: its sum of squares is all-reduced over tp.
- `out_proj` and `l3` are row-parallel (A split along its rows; the partial products are summed);
  `l1`/`l2` column-parallel by channels.
- the embedding is vocab-parallel (rows of the (V, D) table; out-of-range ids contribute zero and the
  partial results are summed); the tied `lm_head` is column-parallel over the same Shard(0) table, so the
  tie survives; with `loss_parallel` its logits stay vocab-sharded (a DTensor) for the cross-entropy.
- a hybrid's softmax layers: q/k/v column-parallel by heads, o_proj row-parallel (RoPE and SDPA are per head).
- sequence parallelism (Megatron-SP, optional): norms and residuals run on sequence shards (B, T/p, D);
  the token/channel mixers all-gather their input and their row-parallel outputs reduce-scatter.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from model.tnl import Lrpe, TokenMixer, TransnormerLM


class BlockColwiseParallel(ParallelStyle):
    """Column-parallel Linear whose output is `blocks` equal blocks, each sharded on its own.

    weight (blocks*N, D) -> local rows [blk_0[r] | blk_1[r] | ...], each N/p rows (`_StridedShard`);
    input: replicated local tensor (B, T, D); output: local (B, T, blocks*N/p).
    """

    def __init__(self, blocks: int):
        super().__init__()
        self.blocks = blocks

    def _partition(self, name, module, mesh):
        placement = [_StridedShard(0, split_factor=self.blocks)]
        for pname, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, mesh, placement),
                                                          requires_grad=p.requires_grad))

    @staticmethod
    def _input(module, inputs, mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        elif x.placements != (Replicate(),):
            x = x.redistribute(placements=[Replicate()])
        return (x, *inputs[1:])

    @staticmethod
    def _output(module, outputs, mesh):
        return outputs.to_local()

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input, self._output)


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the group of x. Each rank's y scales only its own heads, so the true dL/dy is the sum of
    the ranks' partial gradients: the backward is an all-reduce too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class HeadShardedSRMSNorm(nn.Module):
    """SRMSNorm over a feature dim split across the tp group: x (B, T, N/p) holds this rank's heads.

    out = x * rsqrt(sum_allranks(x^2) / N + eps); the sum is an all-reduce whose backward all-reduces too.
    """

    def __init__(self, eps: float, group, tp: int):
        super().__init__()
        self.eps, self.group, self.tp = eps, group, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        sumsq = _AllReduceSum.apply(xf.pow(2).sum(-1, keepdim=True), self.group)
        return (xf * torch.rsqrt(sumsq / (x.shape[-1] * self.tp) + self.eps)).type_as(x)


class _LocalTheta:
    """Stands in for an Lrpe module so `Lrpe.forward` runs on the local heads of a sharded theta."""

    def __init__(self, theta: torch.Tensor):
        self.theta = theta


class HeadShardedLrpe(nn.Module):
    """Lrpe with theta a Shard(0) DTensor over tp (its heads); the math is `Lrpe.forward`'s, on local heads."""

    def __init__(self, lrpe: Lrpe, tp_mesh):
        super().__init__()
        self.theta = nn.Parameter(distribute_tensor(lrpe.theta.data, tp_mesh, [Shard(0)]),
                                  requires_grad=lrpe.theta.requires_grad)  # a frozen theta stays frozen

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return Lrpe.forward(_LocalTheta(self.theta.to_local()), x, offset)


def _shard_heads(mixer: TokenMixer, tp_mesh) -> None:
    """Slopes, LRPE theta and the all-heads norm follow the heads onto their tp rank."""
    p, r = tp_mesh.size(), tp_mesh.get_local_rank()
    h = mixer.heads // p
    mixer.head_start, mixer.head_count = r * h, h
    mixer.reset_buffers()
    mixer.norm = HeadShardedSRMSNorm(mixer.norm.eps, tp_mesh.get_group(), p)
    if mixer.lrpe is not None:
        mixer.lrpe = HeadShardedLrpe(mixer.lrpe, tp_mesh)


def check_tp(model: TransnormerLM, tp: int) -> None:
    cfg = model.cfg
    for name, value in (("model.heads", cfg.heads), ("model.glu_dim", cfg.glu_dim), ("model.vocab_size", cfg.vocab_size)):
        if value % tp:
            raise ValueError(f"{name} ({value}) not divisible by parallel.tp ({tp})")


def apply_tp(model: nn.Module, tp_mesh, loss_parallel: bool = True, sequence_parallel: bool = False,
             fused_head: bool = False) -> nn.Module:
    """Shard a built TransnormerLM in place over the 1-D `tp_mesh`; returns it.

    loss_parallel: logits come back as a DTensor sharded on the vocab (use
    `torch.distributed.tensor.parallel.loss_parallel()` around the cross-entropy); otherwise a full local tensor.
    sequence_parallel: Megatron-SP; the model's inputs stay (B, T) token ids, logits are as above.
    fused_head: the head gets no plan of its own (`parallel.loss.install_fused_head` computes the vocab-parallel
    chunked loss from the tied, vocab-sharded table and the replicated hidden states).
    """
    if not isinstance(model, TransnormerLM):
        raise NotImplementedError(f"tensor parallelism is implemented for the TNL decoder, not {type(model).__name__}")
    tp = tp_mesh.size()
    check_tp(model, tp)
    seq = Shard(1)
    residual = seq if sequence_parallel else Replicate()
    logits_layout = Shard(-1) if loss_parallel else Replicate()
    tied = model.lm_head is not None and model.embed_tokens is not None and model.lm_head.weight is model.embed_tokens.weight

    top = {}
    if model.lm_head is not None and not fused_head:
        top["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=logits_layout,
                                         use_local_output=not loss_parallel)
    if model.embed_tokens is not None:
        top["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    parallelize_module(model, tp_mesh, top)
    if tied:  # both styles shard the (V, D) table on dim 0: re-tie to one parameter
        model.lm_head.weight = model.embed_tokens.weight
    for block in model.layers.values():
        if isinstance(block.token_mixer, TokenMixer):
            _shard_heads(block.token_mixer, tp_mesh)
            plan = {"token_mixer.qkvu_proj": BlockColwiseParallel(blocks=4),
                    "token_mixer.out_proj": RowwiseParallel(output_layouts=residual)}
        else:  # a hybrid's softmax ('S') layer: Megatron attention, q/k/v by heads, o_proj row-parallel
            plan = {f"token_mixer.{n}_proj": ColwiseParallel() for n in "qkv"}
            plan["token_mixer.o_proj"] = RowwiseParallel(output_layouts=residual)
        plan.update({
            "channel_mixer.l1": ColwiseParallel(),
            "channel_mixer.l2": ColwiseParallel(),
            "channel_mixer.l3": RowwiseParallel(output_layouts=residual),
        })
        if sequence_parallel:
            # SRMSNorm has no weight and works per token, so the norms run unchanged on the local sequence
            # shard; the mixers all-gather it (token_mixer's args: x, position_offset, state, return_state).
            plan["token_mixer"] = PrepareModuleInput(input_layouts=(seq, None, None, None),
                                                     desired_input_layouts=(Replicate(), None, None, None),
                                                     use_local_output=True)
            plan["channel_mixer"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                                       use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
    return model


def local_sequence_shard(x: torch.Tensor, tp_mesh) -> torch.Tensor:
    """This tp rank's slice of dim 1 (what sequence-parallel regions hold)."""
    return x.tensor_split(tp_mesh.size(), dim=1)[tp_mesh.get_local_rank()]
