"""Dataset decomposition's speed claim on the softmax baseline: DD vs concat-and-chunk at 8K, same tokens.

    python -m bench.dd_speed [--prepared data/stdlib-2k] [--tokens-per-step 8192] [--min-log2 8] [--max-log2 13]

One run: the Llama baseline (softmax attention: its cost grows with the sequence length) trains one timed step
of `tokens-per-step` tokens at every length 2^i (after a warm-up step each). Concat-and-chunk trains every step at
2^max; DD's steps follow its bucket mix on the prepared corpus (the loader's per-epoch quotas, grow_p2), so its
expected time per step is sum_i share_i x t_i. Prints both, the ratio (DD paper: the same quality at lower cost
because short buckets do less attention work; our target DD <= 0.6x) and the load average.
"""
from __future__ import annotations

import argparse
import os


def step_time(cfg, seq: int, tokens: int) -> float:
    from bench.steps import random_batch, timed, train_step

    return timed(train_step(cfg), random_batch(cfg.model.vocab_size, max(tokens // seq, 1), seq), 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lightspan bench dd_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared", default="data/stdlib-2k")
    p.add_argument("--tokens-per-step", type=int, default=8192)
    p.add_argument("--min-log2", type=int, default=8)
    p.add_argument("--max-log2", type=int, default=13)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from data_pipeline import build_loader
    from pretrain.config import load_config
    from pretrain.distributed import init_process_group

    torch.set_num_threads(args.threads)
    init_process_group("cpu")
    loader = build_loader(args.prepared, kind="dd", tokens_per_step=args.tokens_per_step, min_log2=args.min_log2,
                          max_log2=args.max_log2, curriculum="grow_p2")
    quotas = loader.bucket_steps()
    total = sum(quotas.values())
    cfg = load_config(None, ["--model.arch=llama", "--model.vocab_size=2048", "--model.dim=128", "--model.layers=4",
                             "--model.heads=4", "--model.glu_dim=384", "--train.device=cpu",
                             f"--data.tokens_per_step={args.tokens_per_step}",
                             f"--data.max_log2={args.max_log2}", f"--data.min_log2={args.min_log2}"])
    times = {i: step_time(cfg, 1 << i, args.tokens_per_step) for i in range(args.min_log2, args.max_log2 + 1)}
    dd = sum(quotas[i] / total * times[i] for i in times)
    concat = times[args.max_log2]
    print(f"DD vs concat-and-chunk, Llama baseline (dim 128, 4 layers, softmax), {args.tokens_per_step} tokens per "
          f"step, corpus {args.prepared}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{'length':>8} | {'share of DD steps':>17} | {'s per step':>10}")
    for i, t in times.items():
        print(f"{1 << i:>8} | {quotas[i] / total:>17.3f} | {t:>10.3f}")
    print(f"concat-and-chunk at {1 << args.max_log2}: {concat:.3f} s per step; DD: {dd:.3f} s per step (expected over "
          f"its bucket mix); DD / concat = {dd / concat:.2f}x the time for the same tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
