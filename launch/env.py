"""Where this process sits in the job: read from torchrun's (or slurm's) environment.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Under a bare
`srun python -m pretrain` (no torchrun) slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID stand in, and
MASTER_ADDR/MASTER_PORT must be exported by the job script.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


class LaunchError(RuntimeError):
    """The environment does not describe a consistent distributed job."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env, name) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None


def read_env(env: dict | None = None) -> LaunchEnv:
    env = os.environ if env is None else env
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank, local_world = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE")
    if rank is None and _int(env, "SLURM_PROCID") is not None and _int(env, "SLURM_NTASKS"):
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") or 0
        local_world = _int(env, "SLURM_NTASKS_PER_NODE") or 1
    if rank is None and world is None:
        return LaunchEnv(0, 1, 0, 1, None, None)
    if rank is None or world is None:
        raise LaunchError("RANK and WORLD_SIZE must be set together (launch with torchrun or launch/torchrun.sh)")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
    addr, port = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT")
    if world > 1 and (not addr or port is None):
        raise LaunchError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun "
                          f"(it sets them) or export them in the job script (the head node and a free port)")
    if port is not None and not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a valid TCP port")
    return LaunchEnv(rank, world, local_rank or 0, local_world or 1, addr, port)
