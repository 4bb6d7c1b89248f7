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
from pretrain import checkpoint
from pretrain.config import Config, to_dict
from pretrain.data import build_train_loader
from pretrain.metrics import MetricsLogger, device_peak, memory_bytes
from pretrain.optim import build_optimizer, build_scheduler


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    return torch.device(name)


def step_loss(model, batch: dict, grad_accum: int, autocast) -> tuple[torch.Tensor, int]:
    """Forward+backward over `grad_accum` micro-batches; returns (mean loss over valid tokens, tokens)."""
    ids, labels = batch["input_ids"], batch["labels"]
    offset = int(batch.get("position_offset", 0))
    n_valid = int((labels != -100).sum())
    total = torch.zeros((), dtype=torch.float32, device=ids.device)
    for mb_ids, mb_labels in zip(ids.tensor_split(grad_accum), labels.tensor_split(grad_accum)):
        if mb_ids.numel() == 0:
            continue
        with autocast:
            logits = model(mb_ids, position_offset=offset)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), mb_labels.flatten(), ignore_index=-100, reduction="sum")
        (loss_sum / max(n_valid, 1)).backward()
        total += loss_sum.detach()
    return total / max(n_valid, 1), ids.numel()


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        tc = cfg.train
        self.run_dir = Path(tc.out_dir)
        self.device = pick_device(tc.device)
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.loader, self.tokenizer_vocab = build_train_loader(cfg)
        if self.tokenizer_vocab > cfg.model.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer_vocab} tokens but model.vocab_size is "
                             f"{cfg.model.vocab_size}: raise model.vocab_size or use a smaller tokenizer")
        with torch.device(self.device):
            self.model = build_model(cfg.model)
        self.optimizer = build_optimizer(self.model, tc)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.step = 0
        self.tokens_seen = 0
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if tc.precision == "bf16" else nullcontext())
        self.metrics = MetricsLogger(self.run_dir, tensorboard=cfg.log.tensorboard, peak_flops=device_peak(self.device))
        self.n_params = count_params(self.model)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "step": self.step,
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        checkpoint.load_model_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])

    def save(self) -> Path:
        meta = {"config": to_dict(self.cfg), "tokens_seen": self.tokens_seen, "layout": {"world_size": 1}}
        return checkpoint.save(self.run_dir, self.step, self.state_dict(), meta, self.cfg.checkpoint.keep_last)

    def maybe_resume(self) -> None:
        path = checkpoint.resolve_resume(self.run_dir, self.cfg.checkpoint.resume)
        if path is None:
            return
        state, _ = checkpoint.load(path)
        self.load_state_dict(state)
        print(f"resumed from {path} at step {self.step}", flush=True)

    # -- loop --------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> list[float]:
        """Train to train.steps (or stop once `stop_after` steps are done, saving first). Returns the losses."""
        cfg, tc = self.cfg, self.cfg.train
        last = tc.steps if stop_after is None else min(stop_after, tc.steps)
        self.maybe_resume()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        print(f"run folder: {self.run_dir.resolve()} | params {self.n_params / 1e6:.2f}M | device {self.device}",
              flush=True)
        losses = []
        window = {"tokens": 0, "flops": 0.0, "time": 0.0, "wait": 0.0}
        self.model.train()
        while self.step < last:
            t0 = time.perf_counter()
            batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in next(self.loader).items()}
            t_data = time.perf_counter()
            loss, n_tokens = step_loss(self.model, batch, tc.grad_accum, self.autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens_seen += n_tokens
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {self.step}; lower train.lr or check the data")
            losses.append(loss_value)
            seq_len = batch["input_ids"].shape[1]
            t1 = time.perf_counter()
            window["tokens"] += n_tokens
            window["flops"] += n_tokens * flops_per_token(cfg.model, seq_len)
            window["time"] += t1 - t0
            window["wait"] += t_data - t0
            if self.step % cfg.log.every == 0 or self.step == tc.steps:
                self.metrics.log({
                    "step": self.step, "loss": loss_value, "grad_norm": float(grad_norm), "lr": lr,
                    "seq_len": seq_len, "tokens": self.tokens_seen,
                    "tokens_per_s": window["tokens"] / window["time"],
                    "flops_per_s": window["flops"] / window["time"],
                    "memory_bytes": memory_bytes(self.device), "data_wait": window["wait"] / window["time"],
                }, tc.steps)
                window = {"tokens": 0, "flops": 0.0, "time": 0.0, "wait": 0.0}
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < last:
                self.save()
        final = self.save()
        print(f"checkpoint: {final.resolve()}\ntensorboard: {(self.run_dir / 'tensorboard').resolve()}", flush=True)
        self.metrics.close()
        return losses
