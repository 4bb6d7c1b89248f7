"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay."""
from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.AdamW:
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # LRPE's theta is a frequency table, not a weight matrix: no decay, like norms and biases.
        (no_decay if p.ndim < 2 or "lrpe" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
                             foreach=False)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier on the peak LR at `step` (0-based): linear warmup, then cosine down to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total, min_ratio = train_cfg.warmup_steps, train_cfg.steps, train_cfg.min_lr_ratio  # frozen here
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, min_ratio))
