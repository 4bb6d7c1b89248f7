"""train.compile (regional torch.compile of each block, inductor's C++ backend on CPU) against eager: the same
losses within 1e-5 over 3 steps and two sequence lengths, through the trainer's build and TrainStep."""
import pytest
import torch
from parallel_parity import tiny_config

from parallel.harness import run_distributed

pytestmark = pytest.mark.slow


def _compile_worker(rank, world):
    from parallel.mesh import build_mesh
    from parallel.parallelize import TrainStep, build
    from pretrain.optim import build_optimizer, build_scheduler

    losses = {}
    for compiled in (False, True):
        cfg = tiny_config({}, backend="chunked")
        cfg.train.compile = compiled
        mesh = build_mesh(cfg.parallel)
        model = build(cfg, mesh)
        opt = build_optimizer(model, cfg.train)
        step = TrainStep(model, opt, build_scheduler(opt, cfg.train), cfg, mesh)
        g = torch.Generator().manual_seed(0)
        out = []
        for t in (32, 64, 32):  # dataset decomposition changes the length from step to step
            ids = torch.randint(0, 64, (2, t), generator=g)
            out.append(step({"input_ids": ids, "labels": torch.roll(ids, -1, 1)})[0])
        losses[compiled] = out
    return losses


def test_compiled_blocks_match_eager():
    losses = run_distributed(_compile_worker, world_size=1, timeout_s=600)[0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
