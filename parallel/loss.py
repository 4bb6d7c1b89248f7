"""The one training loss: summed token cross-entropy in fp32, labels equal to IGNORE_INDEX (-100) left out.

Every path divides this sum by the step's global count of valid labels, so micro-batches, dp/cp shards and
pipeline micro-batches all add up to the unsharded token mean. Vocab-sharded DTensor logits (tensor-parallel
loss) take torch's loss-parallel path and come back as this rank's (replicated) value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.sharding import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (..., V), labels (...) -> 0-d fp32 sum of -log p(label) over labels != IGNORE_INDEX."""
    from torch.distributed.tensor import DTensor

    loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss.to_local() if isinstance(loss, DTensor) else loss


def valid_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()


# -- the fused head: linear + cross-entropy, chunked over tokens, never the full logits -------------------------
def _chunk_stats(h, w, y, v0: int):
    """One chunk's logits reduced at once: (row max, sum of exp(logit - max), target logit on this vocab shard)."""
    logits = (h @ w.t()).float()  # (c, V_local)
    v_local = w.shape[0]
    local = y - v0
    mine = (local >= 0) & (local < v_local) & (y != IGNORE_INDEX)
    target = logits.gather(1, local.clamp(0, v_local - 1)[:, None])[:, 0] * mine
    m = logits.max(-1).values
    return m, torch.exp(logits - m[:, None]).sum(-1), target


def _chunk_grads(h, w, y, lse, grad, v0: int):
    """One chunk's (dH, dW): softmax - onehot(target), scaled by the valid mask and the upstream gradient."""
    v_local = w.shape[0]
    p = torch.exp((h @ w.t()).float() - lse[:, None])  # softmax, (c, V_local)
    local = y - v0
    mine = (local >= 0) & (local < v_local) & (y != IGNORE_INDEX)
    p = p.scatter_add(1, local.clamp(0, v_local - 1)[:, None], -mine.float()[:, None])
    p = p * ((y != IGNORE_INDEX).float() * grad)[:, None]
    return p @ w.float(), p.t() @ h.float()


_kernels = {"stats": _chunk_stats, "grads": _chunk_grads}


def compile_loss() -> None:
    """train.compile: the chunk math (elementwise work around the two matrix products) compiled too."""
    _kernels["stats"] = torch.compile(_chunk_stats, dynamic=True)
    _kernels["grads"] = torch.compile(_chunk_grads, dynamic=True)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(h_t W^T, y_t) over valid t, chunk by chunk: forward keeps per token only its log-sum-exp;
    backward recomputes each chunk's logits and accumulates dH and dW in fp32 (chunk x V_local alive at once).

    Vocab-parallel (tp_group given): W is this rank's rows [v0, v0 + V_local) of the table; the max, the sum of
    exponentials and the target logit are all-reduced over tp, and dH (a partial sum over the vocab shards) is
    all-reduced in the backward. hidden: (N, D), replicated over tp; labels: (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, tp_group, v0, reduce_grad=True):
        import torch.distributed as dist

        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        lses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk):
            y = labels[i:i + chunk]
            m, sumexp, target = _kernels["stats"](hidden[i:i + chunk], weight, y, v0)
            if tp_group is not None:
                # the shards' sums of exp(logit - own max) rescaled to the global max before they are added
                m_all = m.clone()
                dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=tp_group)
                sumexp = sumexp * torch.exp(m - m_all)
                m = m_all
                dist.all_reduce(sumexp, group=tp_group)
                dist.all_reduce(target, group=tp_group)
            lse = m + torch.log(sumexp)
            lses[i:i + chunk] = lse
            total += ((lse - target) * (y != IGNORE_INDEX)).sum()
        ctx.save_for_backward(hidden, weight, labels, lses)
        ctx.chunk, ctx.tp_group, ctx.v0, ctx.reduce_grad = chunk, tp_group, v0, reduce_grad
        return total

    @staticmethod
    def backward(ctx, grad_total):
        import torch.distributed as dist

        hidden, weight, labels, lses = ctx.saved_tensors
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for i in range(0, hidden.shape[0], ctx.chunk):
            dh, dw = _kernels["grads"](hidden[i:i + ctx.chunk], weight, labels[i:i + ctx.chunk],
                                       lses[i:i + ctx.chunk], grad_total, ctx.v0)
            d_hidden[i:i + ctx.chunk] = dh
            d_weight += dw
            del dh, dw
        if ctx.tp_group is not None and ctx.reduce_grad:
            dist.all_reduce(d_hidden, group=ctx.tp_group)
        return d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk: int = 4096, tp_group=None, vocab_start: int = 0,
                                 reduce_grad: bool = True) -> torch.Tensor:
    """sum over valid tokens of CE(hidden @ weight^T, labels), fp32, holding at most chunk x V logits.

    hidden (..., D), labels (...); weight (V, D), or under tensor parallelism this rank's vocab rows (a DTensor
    sharded on dim 0, or its local shard with `vocab_start` and `tp_group`). reduce_grad: all-reduce the
    hidden states' gradient over tp (off when the caller's all-gather backward reduce-scatters it anyway)."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        tp_group = mesh.get_group() if mesh.size() > 1 else None
        vocab_start = mesh.get_local_rank() * (weight.shape[0] // mesh.size())
        weight = weight.to_local()
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                            max(int(chunk), 1), tp_group, vocab_start, reduce_grad)


# -- the head strategy: the model's lm_head returns the loss sum while targets are set --------------------------
_targets = __import__("threading").local()


class loss_targets:
    """Within this context a fused head (`install_fused_head`) returns the summed loss for `labels` instead of
    logits: the trainer gets the loss from the model's forward, with the head's weights gathered by FSDP."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels

    def __enter__(self):
        self.previous = getattr(_targets, "labels", None)
        _targets.labels = self.labels
        return self

    def __exit__(self, *exc):
        _targets.labels = self.previous


def install_fused_head(head: torch.nn.Module, chunk: int, seq_group=None) -> None:
    """Replace `head.forward` (an nn.Linear without bias, possibly a vocab-sharded DTensor weight, no TP hooks)
    in place: under `loss_targets` it returns the chunked cross-entropy sum; otherwise the full logits (a
    vocab-sharded weight's logits are all-gathered: evaluation and generation). seq_group: Megatron-SP's tp
    group, over which the sequence-sharded hidden states are gathered first (the labels are whole)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def forward(x):
        labels = getattr(_targets, "labels", None)
        w = head.weight
        if seq_group is not None:
            from torch.distributed.nn.functional import all_gather

            x = torch.cat(all_gather(x.contiguous(), group=seq_group), dim=1)
        if labels is not None:  # under SP the all-gather's backward sums the vocab shards' partial gradients
            return chunked_linear_cross_entropy(x, w, labels, chunk, reduce_grad=seq_group is None)
        if isinstance(w, DTensor):
            logits = x @ w.to_local().t()
            return DTensor.from_local(logits, w.device_mesh, [Shard(logits.dim() - 1)]).redistribute(
                placements=[Replicate()]).to_local()
        return torch.nn.functional.linear(x, w)

    head.forward = forward
    head._lightspan_fused = chunk
