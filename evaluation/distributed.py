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


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns whether this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from pretrain.distributed import init_process_group

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
