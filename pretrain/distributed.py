"""Process group, mesh and coordinates for every run: torchrun's world, or a world of one.

There is one training path: a single process is a (1, 1, 1, 1) mesh over a process group of one, and runs the
same train step and checkpointer as a thousand ranks. Backend: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.mesh import DIMS, Coords, build_mesh, check_layout, coords


@dataclass
class DistEnv:
    rank: int
    world_size: int
    mesh: object  # DeviceMesh (dp, pp, cp, tp)
    coords: Coords

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta):
    """The rendezvous store, namespaced by torchrun's restart count (None outside torchelastic: env:// then).

    After an elastic restart the agent's store still holds the previous attempt's keys, and gloo would read the
    dead workers' addresses from them ("connectFullMesh ... Connection refused"); a per-attempt prefix avoids it.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    from launch.env import read_env

    env = read_env()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env.master_addr, env.master_port, world, is_master=rank == 0 and not agent_store,
                          timeout=timeout, multi_tenant=not agent_store)
    return dist.PrefixStore(f"lightspan/attempt_{attempt}", store)


def init_process_group(device_type: str = "cpu", timeout_s: float = 600.0) -> bool:
    """The one process-group helper: join the group torchrun describes, or make a group of one (no torchrun).

    Backend: nccl on CUDA, gloo on CPU. A world of one uses an in-memory store, so one process runs the very
    same collectives-based code as a thousand (torchtitan's degree-1 mesh). Returns whether this call made it.
    """
    if dist.is_initialized():
        return False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if world <= 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                store=_attempt_store(rank, world, timeout))
    return True


def setup_distributed(cfg, device: torch.device, timeout_s: float = 600.0) -> DistEnv:
    """Init the process group (a world of one without torchrun), check the layout, build the mesh.

    The layout is checked against the world size before any communication, with the numbers in the error
    (a layout that needs several processes, started without torchrun, is refused here).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(cfg.parallel, world, cfg.model, cfg.data, launched=world > 1 or "RANK" in os.environ)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group(device.type, timeout_s)
    mesh = build_mesh(cfg.parallel, device.type)
    return DistEnv(dist.get_rank(), dist.get_world_size(), mesh, coords(mesh))


def describe(env: DistEnv) -> str:
    sizes = "x".join(f"{d}{env.mesh[d].size()}" for d in DIMS)
    return f"world {env.world_size} mesh {sizes}"
