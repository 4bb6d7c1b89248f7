"""Fault injection for the checkpoint/elastic tests, driven by environment variables (all unset in real runs).

    LIGHTSPAN_TEST_PAUSE_AFTER_SAVE=S     rank 0 sleeps S seconds after a checkpoint completes (a window to SIGKILL)
    LIGHTSPAN_TEST_PAUSE_BEFORE_RENAME=S  rank 0 sleeps S seconds after all shards are written, before the rename
    LIGHTSPAN_TEST_CRASH_AT_STEP=N        rank LIGHTSPAN_TEST_CRASH_RANK (default 1) exits hard before step N,
                                          on torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT=0)
    LIGHTSPAN_TEST_NAN_AT_STEP=N          step N's loss and gradients become NaN
"""
from __future__ import annotations

import os
import time

import torch


def _int(name: str) -> int | None:
    raw = os.environ.get(name, "")
    return int(raw) if raw else None


def pause(name: str) -> None:
    seconds = float(os.environ.get(name, "") or 0)
    if seconds > 0:
        time.sleep(seconds)


def maybe_crash(step: int, rank: int) -> None:
    """Called before running `step` (1-based)."""
    if (_int("LIGHTSPAN_TEST_CRASH_AT_STEP") == step and rank == (_int("LIGHTSPAN_TEST_CRASH_RANK") or 1)
            and (_int("TORCHELASTIC_RESTART_COUNT") or 0) == 0):
        print(f"test hook: rank {rank} crashes before step {step}", flush=True)
        os._exit(17)


def maybe_poison(step: int, loss: torch.Tensor | float, parameters) -> torch.Tensor | float:
    """At step LIGHTSPAN_TEST_NAN_AT_STEP: NaN loss and NaN gradients, as an overflow would leave them."""
    if _int("LIGHTSPAN_TEST_NAN_AT_STEP") != step:
        return loss
    for p in parameters:
        if p.grad is not None:
            p.grad.fill_(float("nan"))
    return loss * float("nan")
