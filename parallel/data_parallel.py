"""Data parallelism with sharded optimizer state: FSDP2 (`fully_shard`, the default) or DeepSpeed ZeRO-1/2/3.

Both engines average gradients over their group, which is dp x cp: sequence-parallel ranks hold the same
weights and each sees a slice of every sequence, so their gradients are summed exactly like dp ranks'.
The training step gives each rank the loss `local_sum / global_valid_tokens * group_size`, so the engine's
average is the exact global token mean even when ranks hold different numbers of valid labels.

Gradient accumulation: FSDP2 skips its reduce-scatter on all but the last micro-batch
(`set_requires_gradient_sync`); DeepSpeed ZeRO-1 reduces at the accumulation boundary only, ZeRO-2/3 reduce
(scatter) every micro-batch by design, since they keep only their gradient partition.
"""
from __future__ import annotations

import torch
from torch import nn


def apply_fsdp(model: nn.Module, dp_mesh, units: list[nn.Module], reshard_after_forward: bool = True,
               mp_policy=None) -> nn.Module:
    """fully_shard every unit (the architecture spec's blocks), then the root (embedding, tied head, final
    norm, whatever the units leave). dp_mesh: 1-D."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": dp_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(), "shard_placement_fn": _fsdp_placement}
    blocks = list(units)
    for i, block in enumerate(blocks):
        # The last block is gathered again at once by the root's backward: keeping it avoids a round trip.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    return model


def _fsdp_placement(param):
    """FSDP shards dim 0, except for weights that tp already shards with a stride on dim 0 ([Q|K|V|U]):
    a dp shard nested inside that stride has no DTensor placement, so FSDP takes their columns (dim 1)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(param, DTensor) and any(isinstance(p, _StridedShard) and p.dim == 0 for p in param.placements):
        return Shard(1)
    return None


def deepspeed_config(train_cfg, zero_stage: int, dp_size: int, grad_accum: int) -> dict:
    """DeepSpeed's JSON config for our loop: we feed it one micro-batch per backward, in fp32."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": grad_accum * dp_size,
        "gradient_clipping": train_cfg.grad_clip,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": False},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_deepspeed_comm() -> None:
    """Point `deepspeed.comm` at the torch.distributed process group already running (no new init)."""
    import deepspeed

    if deepspeed.get_accelerator().device_name() == "cpu":
        # On CPU DeepSpeed compiles a shared-memory all-reduce (C++, minutes) at its first init; the gloo
        # process group we already run does the same job.
        import importlib

        ds_comm = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` the attribute is torch
        if hasattr(ds_comm, "build_shm_op"):
            ds_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False)


def apply_deepspeed(model: nn.Module, optimizer, scheduler, train_cfg, zero_stage: int, dp_size: int,
                    grad_accum: int):
    """Wrap model + our torch AdamW in a DeepSpeed engine (the world group is the dp x cp group).

    Returns the engine; its `.optimizer` steps our AdamW on the rank's partition, and it steps `scheduler`.
    """
    import deepspeed

    init_deepspeed_comm()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(train_cfg, zero_stage, dp_size, grad_accum),
                                           dist_init_required=False)
    return engine


def check_deepspeed(pcfg) -> None:
    if pcfg.tp > 1 or pcfg.pp > 1:
        raise ValueError(f"parallel.dp_engine=deepspeed runs with tp=1 and pp=1 (got tp={pcfg.tp}, pp={pcfg.pp}): "
                         f"ZeRO flattens plain parameters and cannot hold tensor-parallel DTensors; use fsdp2")
    if pcfg.zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 1, 2 or 3, got {pcfg.zero_stage}")


def set_grad_sync(model, sync: bool) -> None:
    """FSDP2: reduce-scatter gradients on this backward or keep accumulating locally."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, pp_group=None, counted=None, clip: bool = True) -> torch.Tensor:
    """Global L2 norm over every mesh dim, then scale gradients by min(1, max_norm / norm).

    DTensor gradients (sharded over dp by FSDP and over tp) give a DTensor norm whose `full_tensor()` reduces
    over their mesh; pipeline stages hold different parameters, so their squared norms are summed over pp.
    counted: the parameters that enter the norm (default all); a weight tied across pp stages counts once.
    clip: scale the gradients (else only measure); nothing is scaled by a non-finite norm.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in (params if counted is None else counted) if p.grad is not None]
    if grads:
        total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=False)
        if isinstance(total, DTensor):
            total = total.full_tensor()
    else:  # nothing trainable here (a frozen pipeline stage): it still joins the pp reduction below
        total = torch.zeros((), dtype=torch.float32)
    if pp_group is not None:
        import torch.distributed as dist

        sq = total.pow(2)
        dist.all_reduce(sq, group=pp_group)
        total = sq.sqrt()
    if clip and max_norm > 0 and torch.isfinite(total):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return total
