"""The training loop: one path for every world size (a single process is a mesh of one).

    trainer = Trainer(cfg, callbacks=[...]); trainer.train()

Build: process group + mesh (`pretrain.distributed`), this rank's share of the data (the architecture spec
says whether the loader cuts sequences over cp), the model built on the meta device and materialised after
sharding (`parallel.parallelize.build`), AdamW + schedule, the one `TrainStep`, the one `Checkpointer`.
Loop: batch -> spec.prepare_batch -> forward/backward -> optimizer step, with the NaN policy, metrics window,
checkpoint cadence and any extra behaviour as callbacks (`pretrain.callbacks`).

One optimizer step consumes one batch of `data.tokens_per_step` tokens (one sequence length under dataset
decomposition), split along the batch into `train.grad_accum` micro-batches. The loss is the token-weighted
mean over the whole step, so accumulation changes memory, never the result.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model.flops import count_params
from parallel.parallelize import TrainStep, build, trainable_module
from parallel.specs import spec_for
from pretrain import checkpoint
from pretrain.callbacks import (BatchRecords, CheckpointCadence, MetricsWindow, NanPolicy, Profiler, StepResult,
                                Validation)
from pretrain.config import Config, to_dict
from pretrain.data import build_train_loader, ensure_prepared
from pretrain.distributed import describe, setup_distributed
from pretrain.metrics import MetricsLogger, device_peak, memory_bytes
from pretrain.optim import build_optimizer, build_scheduler

# fields whose change on resume is applied from the resumed step on (and logged); every other field of
# `train` and `data` that shapes the batches or the model must match the checkpoint's
APPLIED_ON_RESUME = ("lr", "min_lr_ratio", "warmup_steps", "steps", "weight_decay", "beta1", "beta2", "eps",
                     "grad_clip", "on_nan", "max_skipped_steps")


def build_train_step(cfg: Config, mesh, device="cpu") -> TrainStep:
    """The model of `cfg` built for this rank of `mesh` (meta device, sharded, materialised), AdamW, the LR
    schedule and the one TrainStep over them: `.model` (what the optimizer steps), `.optimizer`, `.scheduler`."""
    parallelized = build(cfg, mesh, device)
    optimizer = build_optimizer(trainable_module(parallelized), cfg.train)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if cfg.train.precision == "bf16" \
        else nullcontext()
    return TrainStep(parallelized, optimizer, build_scheduler(optimizer, cfg.train), cfg, mesh, autocast)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: Config, callbacks=()):
        self.cfg = cfg
        tc = cfg.train
        self.run_dir = Path(tc.out_dir)
        self.device = pick_device(tc.device)
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.spec = spec_for(cfg.model)
        self.env = setup_distributed(cfg, self.device)
        self.is_main = self.env.is_main
        if self.is_main:  # one rank tokenizes; the others wait and find the shards complete
            ensure_prepared(cfg)
        self.env.barrier()
        c, p = self.env.coords, cfg.parallel
        cp_rank, cp_size = (c.cp, p.cp) if self.spec.loader_cp(cfg) else (0, 1)
        self.loader, self.tokenizer_vocab = build_train_loader(cfg, c.dp, p.dp, cp_rank, cp_size)
        if self.tokenizer_vocab > cfg.model.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer_vocab} tokens but model.vocab_size is "
                             f"{cfg.model.vocab_size}: raise model.vocab_size or use a smaller tokenizer")
        # Under pp `parallelized` is a PipelineRunner; its stage module keeps the global parameter names, so
        # optimizer, checkpoints and grad clipping all work on this rank's stage.
        self.train_step = build_train_step(cfg, self.env.mesh, self.device)
        self.model, self.optimizer, self.scheduler = (self.train_step.model, self.train_step.optimizer,
                                                      self.train_step.scheduler)
        self.n_params = self._global_params()
        self.callbacks = list(callbacks)
        self.checkpointer = checkpoint.Checkpointer(self.run_dir, self.env, cfg.checkpoint.async_save,
                                                    cfg.checkpoint.keep_last, hooks=self.callbacks)
        self.callbacks += [NanPolicy(tc.on_nan, tc.max_skipped_steps), MetricsWindow(cfg.log.every, tc.steps),
                           CheckpointCadence(cfg.checkpoint.every)]
        if cfg.log.batches:
            self.callbacks.append(BatchRecords())
        if cfg.log.val_every:
            self.callbacks.append(Validation(cfg.log.val_every, cfg.log.val_tokens))
        if cfg.profile.steps:
            self.callbacks.append(Profiler(cfg.profile.steps, cfg.profile.memory_snapshot))
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.last_step = tc.steps
        self.dp_size = p.dp  # the dp ranks of one step hold disjoint rows of the batch
        self.metrics = (MetricsLogger.for_run(cfg, self.run_dir, device=self.device, peak_flops=device_peak(self.device))
                        if self.is_main else None)

    def _global_params(self) -> int:
        with torch.device("meta"):
            return count_params(self.spec.build(self.cfg.model))

    def memory_bytes(self) -> int:
        return memory_bytes(self.device)

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook, lambda *a: None)(self, *args)

    # -- state -------------------------------------------------------------------------------------
    def save(self) -> Path:
        p = self.cfg.parallel
        layout = {"world_size": self.env.world_size, "dp": p.dp, "pp": p.pp, "cp": p.cp, "tp": p.tp}
        meta = {"config": to_dict(self.cfg), "tokens_seen": self.tokens_seen, "layout": layout}
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.loader, self.tokens_seen, meta,
                                      engine=self.train_step.engine)

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def maybe_resume(self) -> None:
        """Resume the newest intact checkpoint of the run (any layout), else start from `checkpoint.init_from`
        weights (step 0, fresh optimizer), else from the initialisation."""
        ck = self.cfg.checkpoint
        # rank 0 picks (checksums every file, skips corrupt ones with a warning); the others follow
        path, error = None, None
        if self.is_main:
            try:
                path = checkpoint.pick_resume(self.run_dir, ck.resume)
            except checkpoint.CheckpointError as e:  # every rank raises it, none waits at the broadcast
                error = str(e)
        path, error = self.env.broadcast_object((path, error))
        if error is not None:
            raise checkpoint.CheckpointError(error)
        stage = self.cfg.parallel.pp > 1
        if path is not None:
            meta = checkpoint.read_meta(path)
            self.step, self.tokens_seen = self.checkpointer.load(path, self.model, self.optimizer, self.scheduler,
                                                                 self.loader, stage=stage,
                                                                 engine=self.train_step.engine)
            saved = meta.get("layout", {})
            self._log(f"resumed from {path} at step {self.step} (saved at dp={saved.get('dp')} pp={saved.get('pp')} "
                      f"cp={saved.get('cp')} tp={saved.get('tp')}, now {describe(self.env)})")
            self._log_config_changes(meta.get("config", {}))
            return
        if ck.init_from:
            from pretrain.convert import load_init_weights

            load_init_weights(ck.init_from, self.model, stage=stage)
            self._log(f"initialised the weights from {ck.init_from} (step 0, fresh optimizer)")

    def _log_config_changes(self, saved: dict) -> None:
        before = saved.get("train", {})
        now = to_dict(self.cfg)["train"]
        changed = [f"train.{k} {before[k]!r} -> {now[k]!r}" for k in APPLIED_ON_RESUME
                   if k in before and before[k] != now[k]]
        if changed:
            self._log("config changed on resume, applied from this step: " + ", ".join(changed))

    # -- loop --------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> list[float]:
        """Train to train.steps (or stop once `stop_after` steps are done, saving first). Returns the losses."""
        cfg, tc = self.cfg, self.cfg.train
        self.last_step = tc.steps if stop_after is None else min(stop_after, tc.steps)
        self.maybe_resume()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            print(f"run folder: {self.run_dir.resolve()} | params {self.n_params / 1e6:.2f}M | device {self.device} | "
                  f"{describe(self.env)}", flush=True)
        if self.step >= self.last_step:
            self._log(f"the run is already complete at step {self.step} (train.steps={tc.steps}): nothing to train; "
                      f"raise --train.steps to continue it")
            self.close()
            return []
        losses = []
        self.model.train()
        self._call("on_train_start")
        while self.step < self.last_step:
            step = self.step + 1
            self._call("on_step_start", step)
            t0 = time.perf_counter()
            batch = self.spec.prepare_batch(next(self.loader), cfg, self.env.coords.cp, cfg.parallel.cp)
            batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            seq_len = int(batch["seq_len"])  # the whole sequence (SharedLLM: context + running text)
            result = StepResult(step=step, loss=0.0, seq_len=seq_len, lr=self.scheduler.get_last_lr()[0],
                                tokens=batch["input_ids"].shape[0] * seq_len * self.dp_size, started=t0,
                                data_time=time.perf_counter() - t0, batch=batch)
            result.loss = self.train_step.forward_backward(batch)
            self._call("on_backward_end", result)
            result.grad_norm, result.stepped = self.train_step.optimizer_step(skip=result.skip)
            self.step = step
            self.tokens_seen += result.tokens
            losses.append(result.loss)
            result.time = time.perf_counter() - t0
            self._call("on_step_end", result)
        final = self.save()
        self._call("on_train_end")
        self.close()
        if self.is_main:
            print(f"checkpoint: {final.resolve()}\ntensorboard: {(self.run_dir / 'tensorboard').resolve()}", flush=True)
        return losses

    def close(self) -> None:
        self.checkpointer.finalize()
        if self.metrics is not None:
            self.metrics.close()
