"""torch.compile (train.compile: regional, each block) against eager, measured in the same run.

    python -m bench.compile [--config configs/tiny.yaml] [--seq 2048] [--steps 16] [--threads 2]

Both models are built through the trainer's path (`parallel.build`, world of one, `TrainStep`) from the same
config; each trains `--steps` steps on random batches of `data.tokens_per_step` tokens cut into sequences of
`--seq`. Prints the compile time (the first step's extra time over eager's first step), tokens/s after the
first two steps, and the ratio compiled / eager, with the load average.
"""
from __future__ import annotations

import argparse
import os


def run(cfg_path: str, seq: int, steps: int, compiled: bool) -> tuple[float, float]:
    from bench.steps import random_batch, timed, train_step
    from pretrain.config import load_config

    cfg = load_config(cfg_path, [f"--train.compile={str(compiled).lower()}", "--train.device=cpu"])
    step = train_step(cfg)
    rows = max(cfg.data.tokens_per_step // seq, 1)
    batch = random_batch(cfg.model.vocab_size, rows, seq, seed=1)
    first = timed(step, batch, 1, warmup=0)  # the first step (compiles when compiled)
    return first, rows * seq / timed(step, batch, steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lightspan bench compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from pretrain.distributed import init_process_group

    torch.set_num_threads(args.threads)
    init_process_group("cpu")
    e_first, eager = run(args.config, args.seq, args.steps, False)
    c_first, compiled = run(args.config, args.seq, args.steps, True)
    print(f"compile bench: {args.config} at T={args.seq}, {args.steps} timed steps, {args.threads} threads, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"eager    {eager:>10,.0f} tokens/s")
    print(f"compiled {compiled:>10,.0f} tokens/s   ratio compiled/eager {compiled / eager:.2f}x   "
          f"compile time {c_first - e_first:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
