"""Data parallelism (FSDP2; DeepSpeed ZeRO-1/2/3) against the unsharded model, with gradient accumulation."""
import importlib.util

import pytest

from parallel.harness import run_distributed
from parallel_parity import parity_worker

pytestmark = pytest.mark.distributed


def _fsdp_worker(rank, world):
    return parity_worker(rank, world, {"dp": 2}, steps=10, grad_accum=2)


def test_fsdp2_dp2_matches_unsharded():
    results = run_distributed(_fsdp_worker, world_size=2, timeout_s=120)
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], abs=1e-6)


def _deepspeed_worker(rank, world, stage):
    return parity_worker(rank, world, {"dp": 2, "dp_engine": "deepspeed", "zero_stage": stage}, steps=10,
                         grad_accum=2)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_dp2_matches_unsharded(stage):
    results = run_distributed(_deepspeed_worker, world_size=2, args=(stage,), timeout_s=180)
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], abs=1e-6)
