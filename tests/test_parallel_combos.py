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


@pytest.mark.parametrize("parallel", [
    {"pp": 2, "tp": 2, "microbatches": 2},
    {"pp": 2, "dp": 2, "microbatches": 2},
], ids=["pp2xtp2", "pp2xdp2"])
def test_pipeline_2x2_matches_unsharded(parallel):
    """Pipeline stages (parallel.pipeline) composed with tp / FSDP2: loss, every stage's full gradients, steps."""
    results = run_distributed(_worker, world_size=4, args=(parallel, 1), timeout_s=180)
    for r in results[1:]:
        assert r["losses"] == pytest.approx(results[0]["losses"], abs=1e-6)


def test_dry_run_builds_the_1024_rank_mesh_on_the_fake_backend():
    """`--dry-run` checks the 175B layout (dp8 pp8 cp2 tp8) and builds its mesh without any peer process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pretrain", "--config", "configs/tnl-175b.yaml", "--dry-run",
                          "--parallel.dp=8", "--parallel.pp=8", "--parallel.cp=2", "--parallel.tp=8"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world_size=1024" in out.stdout
    assert "mesh: ('dp', 'pp', 'cp', 'tp') shape (8, 8, 2, 8)" in out.stdout
    assert "tp: size 8, rank 0's group [0, 1, 2, 3, 4, 5, 6, 7]" in out.stdout
    assert "cp: size 2, rank 0's group [0, 8]" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pretrain", "--config", "configs/tnl-175b.yaml", "--dry-run",
                          "--parallel.dp=8", "--parallel.pp=8", "--parallel.cp=2", "--parallel.tp=8",
                          "--model.vocab_size=64001"], capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "model.vocab_size (64001) not divisible by parallel.tp (8)" in bad.stderr
