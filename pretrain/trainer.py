"""The training loop: build, step, log, checkpoint, resume.

One optimizer step consumes one batch of `data.tokens_per_step` tokens (one sequence length under
dataset decomposition), split along the batch into `train.grad_accum` micro-batches. The loss is the
token-weighted mean over the whole step, so accumulation changes memory, never the result.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from model import build_model
from model.flops import count_params, flops_per_token
from pretrain import checkpoint, test_hooks
from pretrain.config import Config, to_dict
from pretrain.data import build_train_loader, ensure_prepared, sharedllm_batch
from pretrain.distributed import describe, full_state, load_full_state, setup_distributed
from pretrain.metrics import MetricsLogger, device_peak, memory_bytes
from pretrain.optim import build_optimizer, build_scheduler


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    return torch.device(name)


def step_loss(model, batch: dict, grad_accum: int, autocast) -> torch.Tensor:
    """Forward+backward over `grad_accum` micro-batches; returns the mean loss over valid tokens."""
    from parallel.parallelize import micro_batches, model_inputs

    ids, labels = batch["input_ids"], batch["labels"]
    offset = int(batch.get("position_offset", 0))
    n_valid = int((labels != -100).sum())
    total = torch.zeros((), dtype=torch.float32, device=ids.device)
    for mb_ids, mb_labels, extra in micro_batches(ids, labels, model_inputs(batch), grad_accum):
        with autocast:
            logits = model(mb_ids, position_offset=offset, **extra)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), mb_labels.flatten(), ignore_index=-100, reduction="sum")
        (loss_sum / max(n_valid, 1)).backward()
        total += loss_sum.detach()
    return total / max(n_valid, 1)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        tc = cfg.train
        self.run_dir = Path(tc.out_dir)
        self.device = pick_device(tc.device)
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        # Distributed (WORLD_SIZE > 1): mesh, this rank's data shard, parallelized model, shared TrainStep.
        self.env = setup_distributed(cfg, self.device)
        self.sharedllm = cfg.model.arch == "sharedllm"  # batches become context chunks + running text
        self.is_main = self.env is None or self.env.is_main
        if self.env is None:
            self.loader, self.tokenizer_vocab = build_train_loader(cfg)
        else:
            if self.is_main:  # one rank tokenizes; the others wait and find the shards complete
                ensure_prepared(cfg)
            self.env.barrier()
            c, p = self.env.coords, cfg.parallel
            # SharedLLM: every cp rank reads the whole sequences and takes its share after the context split
            cp_rank, cp_size = (0, 1) if self.sharedllm else (c.cp, p.cp)
            self.loader, self.tokenizer_vocab = build_train_loader(cfg, c.dp, p.dp, cp_rank, cp_size)
        if self.tokenizer_vocab > cfg.model.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer_vocab} tokens but model.vocab_size is "
                             f"{cfg.model.vocab_size}: raise model.vocab_size or use a smaller tokenizer")
        with torch.device(self.device):
            self.model = build_model(cfg.model)
        self.n_params = count_params(self.model)
        if self.env is not None:
            from parallel.parallelize import parallelize

            from parallel.parallelize import trainable_module

            # Under pp, `parallelized` is a PipelineRunner; its stage module keeps the global parameter names,
            # so optimizer, checkpoints and grad clipping all work on this rank's stage.
            self.parallelized = parallelize(self.model, self.env.mesh, cfg)
            self.model = trainable_module(self.parallelized)
        self.optimizer = build_optimizer(self.model, tc)  # after parallelize: it holds the sharded parameters
        self.skipped_steps = 0
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.step = 0
        self.tokens_seen = 0
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if tc.precision == "bf16" else nullcontext())
        self.train_step = None
        if self.env is not None:
            from parallel.parallelize import TrainStep

            self.train_step = TrainStep(self.parallelized, self.optimizer, self.scheduler, cfg, self.env.mesh, self.autocast)
        # Distributed runs write sharded DCP checkpoints (DeepSpeed keeps full-state ones: its own partitioning).
        self.sharded = None
        if self.env is not None and self.train_step.engine is None:
            from pretrain.sharded_checkpoint import ShardedCheckpointer

            self.sharded = ShardedCheckpointer(self.run_dir, self.env, cfg.checkpoint.async_save,
                                               cfg.checkpoint.keep_last)
        # the dp ranks of one step hold disjoint rows of the batch (cp, tp and pp ranks hold the same sequences)
        self.dp_size = cfg.parallel.dp if self.env is not None else 1
        self.metrics = (MetricsLogger(self.run_dir, tensorboard=cfg.log.tensorboard, peak_flops=device_peak(self.device))
                        if self.is_main else None)

    def optimizer_parameters(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.env is not None:
            model_state, optim_state = full_state(self.model, self.optimizer, self.train_step.engine)
        else:
            model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "step": self.step,
            "tokens_seen": self.tokens_seen,
        }
        if self.env is not None:  # each (dp, cp) rank reads its own shard of the data
            state["loader_by_rank"] = self.env.all_gather_object(self.loader.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.env is not None:
            load_full_state(self.model, self.optimizer, state["model"], state["optimizer"], self.train_step.engine)
            by_rank = state.get("loader_by_rank")
            if not by_rank or len(by_rank) != self.env.world_size:
                raise ValueError(f"the checkpoint's data-loader state is for {len(by_rank or [1])} rank(s), this run "
                                 f"has {self.env.world_size}: resume data order on the layout it was saved with")
            self.loader.load_state_dict(by_rank[self.env.rank])
        else:
            checkpoint.load_model_state(self.model, state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.loader.load_state_dict(state["loader"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])

    def save(self) -> Path:
        p = self.cfg.parallel
        layout = {"world_size": 1} if self.env is None else {"world_size": self.env.world_size, "dp": p.dp,
                                                              "pp": p.pp, "cp": p.cp, "tp": p.tp}
        meta = {"config": to_dict(self.cfg), "tokens_seen": self.tokens_seen, "layout": layout}
        if self.sharded is not None:
            return self.sharded.save(self.step, self.model, self.optimizer, self.scheduler, self.loader,
                                     self.tokens_seen, meta)
        state = self.state_dict()  # every rank joins the gathers
        path = checkpoint.checkpoint_dir(self.run_dir) / f"{checkpoint.PREFIX}{self.step:08d}"
        if self.is_main:
            path = checkpoint.save(self.run_dir, self.step, state, meta, self.cfg.checkpoint.keep_last)
        if self.env is not None:
            self.env.barrier()
        return path

    def maybe_resume(self) -> None:
        # rank 0 picks (checksums every file, skips corrupt ones with a warning); the others follow
        path = checkpoint.pick_resume(self.run_dir, self.cfg.checkpoint.resume) if self.is_main else None
        if self.env is not None:
            path = self.env.broadcast_object(path)
        if path is None:
            return
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") == "dcp":
            if self.sharded is None:
                raise ValueError(f"checkpoint {path} is sharded (DCP): resume it under torchrun with a dp x cp "
                                 f"layout like {meta.get('layout')}, or export its weights with lightspan convert")
            self.step, self.tokens_seen = self.sharded.load(path, self.model, self.optimizer, self.scheduler,
                                                            self.loader)
        else:
            state, _ = checkpoint.load(path)
            self.load_state_dict(state)
        if self.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # -- loop --------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> list[float]:
        """Train to train.steps (or stop once `stop_after` steps are done, saving first). Returns the losses."""
        cfg, tc = self.cfg, self.cfg.train
        last = tc.steps if stop_after is None else min(stop_after, tc.steps)
        self.maybe_resume()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            where = f"device {self.device}" + (f" | {describe(self.env)}" if self.env is not None else "")
            print(f"run folder: {self.run_dir.resolve()} | params {self.n_params / 1e6:.2f}M | {where}", flush=True)
        losses = []
        window = {"tokens": 0, "flops": 0.0, "time": 0.0, "wait": 0.0}
        self.model.train()
        while self.step < last:
            test_hooks.maybe_crash(self.step + 1, self.env.rank if self.env is not None else 0)
            t0 = time.perf_counter()
            batch = next(self.loader)
            if self.sharedllm:
                batch = sharedllm_batch(batch, cfg.model, self.env.coords.cp if self.env is not None else 0,
                                        cfg.parallel.cp if self.env is not None else 1)
            batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            seq_len = int(batch["seq_len"])  # the whole sequence (SharedLLM: context + running text)
            n_tokens = batch["input_ids"].shape[0] * seq_len * self.dp_size
            t_data = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            if self.train_step is not None:
                loss = self.train_step.forward_backward(batch)
            else:
                loss = step_loss(self.model, batch, tc.grad_accum, self.autocast)
            loss = test_hooks.maybe_poison(self.step + 1, loss, self.optimizer_parameters())
            # The loss is global (all ranks agree), so every rank takes the same branch. The single-process path
            # also checks the grad norm; the distributed one clips inside TrainStep and checks the loss only.
            finite = math.isfinite(float(loss))
            if self.train_step is not None and finite:
                grad_norm = self.train_step.optimizer_step()
            elif self.train_step is None:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
                finite = finite and math.isfinite(float(grad_norm))
                if finite:
                    self.optimizer.step()
            self.step += 1
            if not finite:
                if tc.on_nan == "stop":  # raised before any save: the last checkpoint is the last good state
                    if self.sharded is not None:
                        self.sharded.finalize()  # an async save of an earlier, good step still completes
                    raise FloatingPointError(f"loss {float(loss)} / non-finite gradients at step {self.step}; lower "
                                             f"train.lr, check the data, or set train.on_nan=skip")
                grad_norm = float("nan")
                self.skipped_steps += 1
                if self.is_main:
                    print(f"step {self.step}: non-finite loss or gradients, update skipped "
                          f"({self.skipped_steps} so far)", flush=True)
            if self.train_step is None or not finite:  # TrainStep.optimizer_step steps and zeroes itself
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.tokens_seen += n_tokens
            loss_value = float(loss)
            losses.append(loss_value)
            t1 = time.perf_counter()
            window["tokens"] += n_tokens
            window["flops"] += n_tokens * flops_per_token(cfg.model, seq_len)
            window["time"] += t1 - t0
            window["wait"] += t_data - t0
            if self.is_main and (self.step % cfg.log.every == 0 or self.step == tc.steps):
                self.metrics.log({
                    "step": self.step, "loss": loss_value, "grad_norm": float(grad_norm), "lr": lr,
                    "seq_len": seq_len, "tokens": self.tokens_seen,
                    "tokens_per_s": window["tokens"] / window["time"],
                    "flops_per_s": window["flops"] / window["time"],
                    "memory_bytes": memory_bytes(self.device), "data_wait": window["wait"] / window["time"],
                    "skipped_steps": self.skipped_steps,
                }, tc.steps)
                window = {"tokens": 0, "flops": 0.0, "time": 0.0, "wait": 0.0}
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < last:
                self.save()
        final = self.save()
        if self.sharded is not None:
            self.sharded.finalize()
        if self.is_main:
            print(f"checkpoint: {final.resolve()}\ntensorboard: {(self.run_dir / 'tensorboard').resolve()}", flush=True)
            self.metrics.close()
        return losses
