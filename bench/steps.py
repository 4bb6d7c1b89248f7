"""What the step benchmarks share: a training step of a config on a world of one, a seeded random batch, and a
timer over steps after warm-up."""
from __future__ import annotations

import time


def train_step(cfg):
    """The trainer's own TrainStep for `cfg` on a (1, 1, 1, 1) mesh (the process group must exist)."""
    from parallel.mesh import build_mesh
    from pretrain.trainer import build_train_step

    return build_train_step(cfg, build_mesh(cfg.parallel))


def random_batch(vocab: int, rows: int, seq: int, seed: int = 0) -> dict:
    """(rows, seq) random token ids and their next-token labels."""
    import torch

    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}


def timed(step, batch: dict, steps: int, warmup: int = 1) -> float:
    """Seconds per step, averaged over `steps` after `warmup` untimed ones."""
    for _ in range(warmup):
        step(batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return (time.perf_counter() - t0) / steps
