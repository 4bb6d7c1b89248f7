"""launch/: environment reading and the shell launchers' syntax."""
import subprocess
from pathlib import Path

import pytest

from launch.env import LaunchError, read_env

ROOT = Path(__file__).resolve().parents[1]


def test_single_process_without_env():
    env = read_env({})
    assert (env.rank, env.world_size, env.distributed) == (0, 1, False)


def test_torchrun_env():
    env = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (3, 8, 1, 29500)


def test_slurm_env_without_torchrun():
    env = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4",
                    "MASTER_ADDR": "head", "MASTER_PORT": "31000"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 16, 1, 4)


@pytest.mark.parametrize("env, words", [
    ({"RANK": "0"}, "RANK and WORLD_SIZE"),
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "outside WORLD_SIZE=4"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR/MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "99999"}, "not a valid TCP port"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
])
def test_bad_rendezvous_env_is_clear(env, words):
    with pytest.raises(LaunchError, match=words):
        read_env(env)


def test_launch_scripts_parse():
    for script in [ROOT / "launch/torchrun.sh", *sorted((ROOT / "launch/slurm").glob("*.sbatch"))]:
        subprocess.run(["bash", "-n", str(script)], check=True)
