"""Data-parallel evaluation: each rank scores a strided share of the examples, then all ranks gather them.

Examples are indexed 0..n-1; rank r takes r, r+W, r+2W, ... Results are gathered as (index, record) pairs
with `all_gather_object` (gloo on CPU, NCCL on GPUs) and put back in index order, so every aggregate is
computed over the same ordered list whatever the world size.
"""
from __future__ import annotations

import os

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device: str | None = "auto") -> str:
    """The device this process evaluates on, checked before any model is loaded.

    "auto" (or None / ""): cuda when torch sees a GPU, else cpu. Under torchrun (WORLD_SIZE > 1) a bare "cuda"
    (given or chosen) becomes cuda:LOCAL_RANK, one GPU per rank as NCCL needs. Refused with a one-line
    ValueError: a name torch does not know, cuda without a visible GPU, an index past the visible GPUs.
    """
    import torch

    name = str(device or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device torch knows; use auto, cpu or cuda") from None
    if dev.type != "cuda":
        return str(dev)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {device}: no CUDA GPU is visible to this process "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                         f"use --device cpu")
    index = dev.index
    if index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        if index >= count:
            raise ValueError(f"--device {device}: local rank {index} has no GPU of its own (only {count} visible); "
                             f"start at most {count} processes per node (torchrun --nproc_per_node {count}) "
                             f"or use --device cpu")
    if index is not None and index >= count:
        raise ValueError(f"--device {device}: only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
    return "cuda" if index is None else f"cuda:{index}"


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns whether this call created it.
    device: a resolved one (resolve_device); a CUDA device becomes this process's current one before NCCL."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from pretrain.distributed import init_process_group

    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))
    return init_process_group("cuda" if device.startswith("cuda") else "cpu", timeout_s)


def my_share(n: int) -> list[int]:
    rank, world = rank_world()
    return list(range(rank, n, world))


def gather_indexed(local: dict) -> list:
    """{index: record} of this rank -> every rank's records, in index order."""
    rank, world = rank_world()
    if world == 1:
        return [local[i] for i in sorted(local)]
    parts = [None] * world
    dist.all_gather_object(parts, sorted(local.items()))
    merged = dict(pair for part in parts for pair in part)
    return [merged[i] for i in sorted(merged)]


def is_main() -> bool:
    return rank_world()[0] == 0
