"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), generated, plus a tiny training recipe.

One example of length T with N key-value pairs over a vocabulary of V tokens:
    keys   N distinct tokens from [1, V/2), values N distinct tokens from [V/2, V) (disjoint halves);
    input  k_1 v_1 k_2 v_2 ... k_N v_N, then the query region: key k_i reappears at slot g_i (slot g covers
           2 tokens), the gaps g_i drawn without replacement from p(g) ~ (g + 1)^(a - 1), a power law that makes
           short gaps likely and long ones possible; every other position (the one after each query included,
           as in Zoology) holds a random token.
    target at the position of a query key: its value (everything else is IGNORE).
Accuracy is measured on the query positions only (argmax of the next-token distribution). A guesser that
knows the answer is a value token scores 2/V. Needs T >= 4N.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import gather_indexed, my_share
from .model_io import IGNORE, argmax_tokens


def make_mqar(n_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int, power_a: float = 0.01,
              seed: int = 0, random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (n_examples, seq_len) int64; targets IGNORE except at query positions."""
    n, kv = n_examples, num_kv_pairs
    if seq_len < 4 * kv:
        raise ValueError(f"MQAR needs seq_len >= 4 x num_kv_pairs ({seq_len} < {4 * kv})")
    if vocab_size // 2 - 1 < kv:
        raise ValueError(f"vocab_size {vocab_size} has fewer than {kv} keys in its lower half")
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = np.stack([rng.choice(np.arange(1, half), kv, replace=False) for _ in range(n)])
    values = np.stack([rng.choice(np.arange(half, vocab_size), kv, replace=False) for _ in range(n)])
    context = np.zeros((n, 2 * kv), np.int64)
    context[:, 0::2], context[:, 1::2] = keys, values

    slots = (seq_len - 2 * kv) // 2
    p = (np.arange(1, slots + 1, dtype=np.float64)) ** (power_a - 1)
    p /= p.sum()
    gaps = np.stack([rng.choice(slots, kv, replace=False, p=p) for _ in range(n)])  # (n, kv)
    query = np.zeros((n, seq_len - 2 * kv), np.int64)
    answer = np.full((n, seq_len - 2 * kv), IGNORE, np.int64)
    rows = np.arange(n)[:, None]
    query[rows, 2 * gaps] = keys
    answer[rows, 2 * gaps] = values  # the target AT the key's position is the next token: its value
    inputs = np.concatenate([context, query], axis=1)
    targets = np.concatenate([np.full((n, 2 * kv), IGNORE, np.int64), answer], axis=1)
    filler = np.zeros_like(inputs, dtype=bool)
    filler[:, 2 * kv:] = query == 0
    if random_non_queries:
        inputs[filler] = rng.integers(1, vocab_size, int(filler.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 64) -> dict:
    """Query-position accuracy; examples are shared out over data-parallel ranks."""
    mine = my_share(len(inputs))
    local = {}
    for j in range(0, len(mine), batch_size):
        idx = mine[j:j + batch_size]
        pred = argmax_tokens(model, inputs[idx])
        asked = targets[idx] != IGNORE
        right = ((pred == targets[idx]) & asked).sum(1)
        for row, i in enumerate(idx):
            local[i] = (int(right[row]), int(asked[row].sum()))
    records = gather_indexed(local)
    correct, total = sum(r[0] for r in records), sum(r[1] for r in records)
    return {"accuracy": correct / max(total, 1), "correct": correct, "queries": total, "examples": len(records)}


@dataclasses.dataclass
class MQARSpec:
    """The recipe's default is small enough that both a 2-layer softmax model and a 2-layer TNL learn it on a
    2-core CPU in one to two minutes (measured: softmax ~200 steps, TNL ~1200 steps at batch 64, lr 3e-3)."""

    seq_len: int = 32
    num_kv_pairs: int = 4
    vocab_size: int = 32
    power_a: float = 0.01


def evaluate(model, spec: MQARSpec, n_examples: int = 256, seed: int = 12345, batch_size: int = 64,
             lengths=None) -> dict:
    """Query accuracy at spec.seq_len; with `lengths`, also `by_length`: the same task (same key-value pairs
    count, power law over the longer query region) at each sequence length, [{seq_len, accuracy, correct, queries,
    examples}], the spec's own length included."""
    inputs, targets = make_mqar(n_examples, spec.seq_len, spec.num_kv_pairs, spec.vocab_size, spec.power_a, seed)
    out = accuracy(model, inputs, targets, batch_size)
    res = {"task": "mqar", **dataclasses.asdict(spec), "seed": seed, "chance": 2 / spec.vocab_size, **out}
    if lengths:
        by_length = []
        for n in sorted(set(int(x) for x in lengths) | {spec.seq_len}):
            if n == spec.seq_len:
                point = out
            elif n < 4 * spec.num_kv_pairs:
                continue
            else:
                x, y = make_mqar(n_examples, n, spec.num_kv_pairs, spec.vocab_size, spec.power_a, seed)
                point = accuracy(model, x, y, max(1, batch_size * spec.seq_len // n))
            by_length.append({"seq_len": n, **point})
        res["by_length"] = by_length
    return res


# ------------------------------------------------------------------------------------------------------------
# training recipe: a tiny model learns MQAR in about a minute on CPU
# ------------------------------------------------------------------------------------------------------------
def train_mqar(arch: str = "tnl", spec: MQARSpec | None = None, steps: int = 1500, batch_size: int = 64,
               dim: int = 64, layers: int = 2, heads: int = 2, lr: float = 3e-3, seed: int = 0,
               log_every: int = 50, time_limit_s: float | None = None, model_overrides: dict | None = None):
    """Train a tiny `arch` model on freshly generated MQAR batches (loss on query positions only).

    Returns (model, history: list of {step, loss, seconds}). AdamW, linear warm-up over 10% of the steps then
    cosine decay; stops early once `time_limit_s` has passed."""
    from model import ModelConfig, build_model

    spec = spec or MQARSpec()
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=spec.vocab_size, dim=dim, layers=layers, heads=heads, glu_dim=2 * dim,
                      lrpe_layers=[0] if arch == "tnl" else [], **(model_overrides or {}))
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = make_mqar(batch_size, spec.seq_len, spec.num_kv_pairs, spec.vocab_size, spec.power_a,
                         seed=seed * 1_000_003 + step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        elapsed = time.perf_counter() - t0
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": loss.item(), "seconds": elapsed})
        if time_limit_s is not None and elapsed > time_limit_s:
            history.append({"step": step + 1, "loss": loss.item(), "seconds": elapsed, "stopped": "time limit"})
            break
    return model.eval(), history


def save_mqar_model(model, spec: MQARSpec, out_dir, history: list) -> Path:
    """A checkpoint folder `lightspan eval` loads; meta.json carries the MQAR spec the model was trained on."""
    from pretrain import checkpoint

    meta = {"config": {"model": dataclasses.asdict(model.cfg)}, "mqar": dataclasses.asdict(spec),
            "history": history}
    return checkpoint.save_weights(out_dir, history[-1]["step"] if history else 0, model.state_dict(), meta)
