"""Two-dimensional meshes (4 gloo ranks): tp x dp (FSDP2 over tensor-parallel DTensors), tp x cp
(LASP-2 inside tensor-parallel heads), cp x dp (LASP-2 under FSDP2 over the flattened dp x cp group)."""
import pytest

from parallel.harness import run_distributed
from parallel_parity import parity_worker

pytestmark = pytest.mark.distributed


def _worker(rank, world, parallel, grad_accum):
    return parity_worker(rank, world, parallel, steps=10, grad_accum=grad_accum)


@pytest.mark.parametrize("parallel,grad_accum", [
    ({"dp": 2, "tp": 2}, 2),
    ({"cp": 2, "tp": 2}, 1),
    ({"dp": 2, "cp": 2}, 1),
], ids=["tp2xdp2", "tp2xcp2", "cp2xdp2"])
def test_2x2_mesh_matches_unsharded(parallel, grad_accum):
    results = run_distributed(_worker, world_size=4, args=(parallel, grad_accum), timeout_s=180)
    for r in results[1:]:
        assert r["losses"] == pytest.approx(results[0]["losses"], abs=1e-6)
