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


class Validation(Callback):
    """`log.val_every`: the mean loss on `log.val_tokens` held-out tokens (the documents the preparation kept out
    of training), cut into sequences of the longest training length and shared over the ranks like a training
    batch (dp rows, cp columns), every N steps and at the end. Needs a held-out split and pp = 1."""

    def __init__(self, every: int, tokens: int):
        self.every, self.tokens, self.batch = every, tokens, None

    def _say(self, trainer, msg: str) -> None:
        if trainer.is_main:
            print(f"validation: {msg}", flush=True)

    def on_train_start(self, trainer) -> None:
        import numpy as np
        import torch

        from data_pipeline import TokenStore

        cfg = trainer.cfg
        if cfg.parallel.pp > 1:
            return self._say(trainer, "off: not implemented through the pipeline schedule (parallel.pp > 1)")
        try:
            store = TokenStore(cfg.data.prepared_dir)
        except (OSError, ValueError) as e:
            return self._say(trainer, f"off: {e}")
        if not len(store.heldout):
            return self._say(trainer, f"off: {cfg.data.prepared_dir} has no held-out split; prepare it with "
                                      f"data.holdout_docs=N (or data.holdout=F) for a validation loss")
        d = cfg.data
        length = d.seq_len if d.loader == "concat" else 2 ** d.max_log2
        parts, total = [], 0
        for start, n in store.heldout:
            parts.append(store.read(int(start), int(n)))
            total += int(n)
            if total > self.tokens + 1:
                break
        stream = np.concatenate(parts)[:self.tokens + 1]
        dp, cp = cfg.parallel.dp, cfg.parallel.cp
        rows = (min(self.tokens, len(stream) - 1) // length) // dp * dp
        if rows == 0:
            return self._say(trainer, f"off: the held-out split holds {len(stream):,} tokens, fewer than "
                                      f"{dp} sequence(s) of {length}")
        xy = torch.from_numpy(stream[:rows * length + 1].astype(np.int64))
        ids, labels = xy[:-1].view(rows, length), xy[1:].view(rows, length)
        c = trainer.env.coords
        per = rows // dp
        ids, labels = ids[c.dp * per:(c.dp + 1) * per], labels[c.dp * per:(c.dp + 1) * per]
        cp_rank, cp_size = (c.cp, cp) if trainer.spec.loader_cp(cfg) else (0, 1)
        w = length // cp_size
        batch = {"input_ids": ids[:, cp_rank * w:(cp_rank + 1) * w], "labels": labels[:, cp_rank * w:(cp_rank + 1) * w],
                 "seq_len": length, "position_offset": cp_rank * w}
        batch = trainer.spec.prepare_batch(batch, cfg, c.cp, cp)
        self.batch = {k: (v.to(trainer.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        self.count = rows * length

    def _run(self, trainer, step: int) -> None:
        loss = trainer.train_step.evaluate(self.batch)
        if trainer.is_main:
            trainer.metrics.log_validation(step, loss, self.count)

    def on_step_end(self, trainer, r: StepResult) -> None:
        if self.batch is not None and r.step % self.every == 0 and r.step < trainer.last_step:
            self._run(trainer, r.step)

    def on_train_end(self, trainer) -> None:
        if self.batch is not None:
            self._run(trainer, trainer.step)


class Profiler(Callback):
    """`profile.steps`: a torch.profiler trace of each listed step per rank (<run>/profile/rank<r>_step<n>.json,
    chrome://tracing or Perfetto), and with `profile.memory_snapshot` on a GPU a CUDA memory snapshot of it
    (<run>/profile/rank<r>_step<n>_memory.pickle, pytorch.org/memory_viz)."""

    def __init__(self, steps, memory_snapshot: bool):
        self.steps, self.snapshot, self.prof = {int(s) for s in steps}, memory_snapshot, None

    def on_step_start(self, trainer, step: int) -> None:
        import torch

        if step not in self.steps:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.snapshot:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.__enter__()

    def on_step_end(self, trainer, r: StepResult) -> None:
        import torch

        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        folder = trainer.run_dir / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / f"rank{trainer.env.rank}_step{r.step}.json"
        self.prof.export_chrome_trace(str(trace))
        self.prof = None
        where = [str(trace)]
        if trainer.device.type == "cuda" and self.snapshot:
            snap = folder / f"rank{trainer.env.rank}_step{r.step}_memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snap))
            torch.cuda.memory._record_memory_history(enabled=None)
            where.append(str(snap))
        if trainer.is_main:
            print(f"profile of step {r.step}: {', '.join(where)} (every rank writes its own)", flush=True)
