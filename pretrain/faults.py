"""Fault injection, for the crash/elastic/NaN tests: a callback that the entry point installs only when one of
these variables is set (product code never imports a test module):

    LIGHTSPAN_FAULT_PAUSE_AFTER_SAVE=S     rank 0 sleeps S seconds after a checkpoint completes (a window to SIGKILL)
    LIGHTSPAN_FAULT_PAUSE_BEFORE_RENAME=S  rank 0 sleeps S seconds after all shards are written, before the rename
    LIGHTSPAN_FAULT_CRASH_AT_STEP=N        rank LIGHTSPAN_FAULT_CRASH_RANK (default 1) exits hard before step N,
                                           on torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT=0)
    LIGHTSPAN_FAULT_NAN_AT_STEP=N          step N's loss and gradients become NaN
"""
from __future__ import annotations

import math
import os
import time

from pretrain.callbacks import Callback, StepResult

VARIABLES = ("LIGHTSPAN_FAULT_PAUSE_AFTER_SAVE", "LIGHTSPAN_FAULT_PAUSE_BEFORE_RENAME", "LIGHTSPAN_FAULT_CRASH_AT_STEP",
             "LIGHTSPAN_FAULT_NAN_AT_STEP")


def _int(name: str) -> int | None:
    raw = os.environ.get(name, "")
    return int(raw) if raw else None


def _pause(name: str) -> None:
    seconds = float(os.environ.get(name, "") or 0)
    if seconds > 0:
        time.sleep(seconds)


class FaultInjector(Callback):
    def on_step_start(self, trainer, step: int) -> None:
        rank = trainer.env.rank
        if (_int("LIGHTSPAN_FAULT_CRASH_AT_STEP") == step and rank == (_int("LIGHTSPAN_FAULT_CRASH_RANK") or 1)
                and (_int("TORCHELASTIC_RESTART_COUNT") or 0) == 0):
            print(f"fault injection: rank {rank} crashes before step {step}", flush=True)
            os._exit(17)

    def on_backward_end(self, trainer, result: StepResult) -> None:
        """At step LIGHTSPAN_FAULT_NAN_AT_STEP: NaN loss and NaN gradients, as an overflow would leave them."""
        if _int("LIGHTSPAN_FAULT_NAN_AT_STEP") != result.step:
            return
        for p in trainer.model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
        result.loss = math.nan

    # Checkpointer hooks (rank 0)
    def on_checkpoint_staged(self, path) -> None:
        _pause("LIGHTSPAN_FAULT_PAUSE_BEFORE_RENAME")

    def on_checkpoint_saved(self, path) -> None:
        _pause("LIGHTSPAN_FAULT_PAUSE_AFTER_SAVE")


def from_environment() -> list:
    """[FaultInjector()] when any fault variable is set, else []."""
    return [FaultInjector()] if any(os.environ.get(v) for v in VARIABLES) else []
