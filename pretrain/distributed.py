"""The trainer's multi-process path: process group from the torchrun environment, mesh, coordinates, and
layout-independent (full-tensor) checkpoint state.

A run is distributed when WORLD_SIZE > 1 (torchrun, slurm via launch/). Backend: nccl on CUDA, gloo on CPU.
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


def setup_distributed(cfg, device: torch.device, timeout_s: float = 600.0) -> DistEnv | None:
    """None for a single process; else init the process group, check the layout and build the mesh.

    The layout is checked against the world size before any communication, with the numbers in the error.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    check_layout(cfg.parallel, world, cfg.model, cfg.data)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timeout, store=_attempt_store(rank, world, timeout))
    mesh = build_mesh(cfg.parallel, device.type)
    return DistEnv(rank, world, mesh, coords(mesh))


def describe(env: DistEnv) -> str:
    sizes = "x".join(f"{d}{env.mesh[d].size()}" for d in DIMS)
    return f"world {env.world_size} mesh {sizes}"


def full_state(model, optimizer, engine=None) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts, identical to a single-process run's keys and values.

    Every rank takes part in the gathers; the result is complete on every rank (cheap for the models we
    save this way; sharded DCP checkpoints are the path for large ones).
    """
    if engine is not None:  # DeepSpeed: weights only (its optimizer state is partitioned its own way)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # a no-op below ZeRO-3
            return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}, {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=False))


def load_full_state(model, optimizer, model_state: dict, optim_state: dict, engine=None) -> None:
    """Load full state dicts (as `full_state` returns) into a sharded model and optimizer, any layout."""
    if engine is not None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=0):
            engine.module.load_state_dict(model_state)
        if dist.get_rank() == 0:
            print("note: dp_engine=deepspeed checkpoints hold the weights only; AdamW moments restart at zero",
                  flush=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
