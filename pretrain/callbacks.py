"""What the training loop does besides stepping, as callbacks: NaN policy, metrics window, checkpoint cadence,
per-rank batch records. The loop (`pretrain.trainer`) calls, on every rank:

    on_train_start(trainer)            after resume / init_from, before the first step
    on_step_start(trainer, step)       step: the 1-based number of the step about to run
    on_backward_end(trainer, result)   loss known, gradients accumulated; set result.skip to drop the update
    on_step_end(trainer, result)       after the optimizer step (result.stepped, result.grad_norm)
    on_train_end(trainer)              after the final save

A callback raises to stop the run (nothing after the last checkpoint is saved). Fault injection for the tests
(`pretrain.faults`) is one more callback, installed by the entry point only when its variables are set.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field


@dataclass
class StepResult:
    step: int
    loss: float
    seq_len: int
    tokens: int  # the job's tokens in this step (all dp ranks)
    lr: float
    started: float  # perf_counter at the step's start
    data_time: float  # seconds waiting for the batch
    batch: dict = field(repr=False, default_factory=dict)
    skip: bool = False
    grad_norm: float = float("nan")
    stepped: bool = False
    time: float = 0.0  # seconds for the whole step


class Callback:
    def on_train_start(self, trainer) -> None: ...

    def on_step_start(self, trainer, step: int) -> None: ...

    def on_backward_end(self, trainer, result: StepResult) -> None: ...

    def on_step_end(self, trainer, result: StepResult) -> None: ...

    def on_train_end(self, trainer) -> None: ...


class NanPolicy(Callback):
    """train.on_nan: stop (raise, naming the step; the last checkpoint is the last good state) or skip (drop that
    update), with at most `train.max_skipped_steps` skipped updates in a run before it stops anyway."""

    def __init__(self, on_nan: str, max_skipped: int):
        self.on_nan, self.max_skipped, self.skipped = on_nan, max_skipped, 0

    def _stop(self, trainer, what: str) -> None:
        trainer.checkpointer.finalize()  # an async save of an earlier, good step still completes
        raise FloatingPointError(what)

    def on_backward_end(self, trainer, result: StepResult) -> None:
        if not math.isfinite(result.loss):
            if self.on_nan == "stop":
                self._stop(trainer, f"loss {result.loss} at step {result.step}; lower train.lr, check the data, or "
                                    f"set train.on_nan=skip")
            result.skip = True

    def on_step_end(self, trainer, result: StepResult) -> None:
        if result.stepped:
            return
        if self.on_nan == "stop":
            self._stop(trainer, f"non-finite gradients (norm {result.grad_norm}) at step {result.step}; lower "
                                f"train.lr, check the data, or set train.on_nan=skip")
        self.skipped += 1
        trainer.skipped_steps = self.skipped
        if trainer.is_main:
            print(f"step {result.step}: non-finite loss or gradients, update skipped ({self.skipped} so far, "
                  f"at most train.max_skipped_steps={self.max_skipped})", flush=True)
        if self.skipped > self.max_skipped:
            self._stop(trainer, f"{self.skipped} updates skipped for non-finite loss or gradients (more than "
                                f"train.max_skipped_steps={self.max_skipped}); the run stops at step {result.step}: "
                                f"lower train.lr or check the data, then resume from the last checkpoint")


class MetricsWindow(Callback):
    """Accumulates over `log.every` steps and logs (rank 0): loss averaged over the window and the last step's,
    ms per step, tokens/s per device and for the job, MFU = job FLOP/s / (world size x device peak)."""

    def __init__(self, every: int, total_steps: int):
        self.every, self.total = every, total_steps
        self._reset()

    def _reset(self) -> None:
        self.w = {"steps": 0, "loss": 0.0, "tokens": 0, "flops": 0.0, "time": 0.0, "wait": 0.0}

    def on_step_end(self, trainer, r: StepResult) -> None:
        from model.flops import flops_per_token

        w = self.w
        w["steps"] += 1
        w["loss"] += r.loss
        w["tokens"] += r.tokens
        w["flops"] += r.tokens * flops_per_token(trainer.cfg.model, r.seq_len)
        w["time"] += r.time
        w["wait"] += r.data_time
        if trainer.is_main and (r.step % self.every == 0 or r.step == self.total):
            world = trainer.env.world_size
            left = self.total - r.step
            trainer.metrics.log({
                "step": r.step, "loss": w["loss"] / w["steps"], "loss_last": r.loss, "grad_norm": r.grad_norm,
                "lr": r.lr, "seq_len": r.seq_len, "tokens": trainer.tokens_seen,
                "ms_per_step": 1e3 * w["time"] / w["steps"],
                "eta_s": left * w["time"] / w["steps"],
                "tokens_per_s": w["tokens"] / w["time"],
                "tokens_per_s_per_device": w["tokens"] / w["time"] / world,
                "flops_per_s": w["flops"] / w["time"], "world_size": world,
                "memory_bytes": trainer.memory_bytes(), "data_wait": w["wait"] / w["time"],
                "skipped_steps": trainer.skipped_steps,
            }, self.total)
        if r.step % self.every == 0:
            self._reset()


class CheckpointCadence(Callback):
    """Save every `checkpoint.every` steps (the loop saves the last step itself)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer, r: StepResult) -> None:
        if self.every and r.step % self.every == 0 and r.step < trainer.last_step:
            trainer.save()


class BatchRecords(Callback):
    """`log.batches`: every rank appends, per step, what it read (each row's global start offset, its cp chunk
    and a sha256 of the token ids) to `<run>/batches/rank<r>.jsonl`, so a run's data stream can be audited from
    the data itself (exactly once, in order, across resumes and layout changes)."""

    def on_train_start(self, trainer) -> None:
        folder = trainer.run_dir / "batches"
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank{trainer.env.rank}.jsonl", "a")

    def on_backward_end(self, trainer, r: StepResult) -> None:
        b, c = r.batch, trainer.env.coords
        ids = b["input_ids"].cpu()
        starts = b.get("starts")
        rows = [{"start": int(starts[i]) if starts is not None else None,
                 "sha256": hashlib.sha256(ids[i].numpy().tobytes()).hexdigest()} for i in range(ids.shape[0])]
        self.file.write(json.dumps({"step": r.step, "dp": c.dp, "cp": c.cp, "tp": c.tp, "pp": c.pp,
                                    "position_offset": int(b.get("position_offset", 0)), "rows": rows,
                                    "time": time.time()}) + "\n")
        self.file.flush()

    def on_train_end(self, trainer) -> None:
        self.file.close()
