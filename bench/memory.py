"""What a training step keeps per token: activation checkpointing modes and the fused chunked loss, measured.

    python -m bench.memory [--layers 8] [--dim 256] [--vocab 2048] [--seq 1024 4096] [--write]

Each measurement is a fresh process that builds the model through the trainer's path (`parallel.build` on a
world of one, `TrainStep`), resets the peak-RSS counter (/proc/self/clear_refs, VmHWM) and runs two training
steps on one sequence of T tokens. The growth of the peak over the resting RSS, differenced between two lengths,
is what the step keeps per token; divided by layers x dim x 4 bytes it is the fp32 words per token per layer per
model dimension. `--write` also measures at half the layers, splits the words per token per dim into a part per
layer (what each block saves) and a part once per step (the block being recomputed or backpropagated, the loss),
and stores both in pretrain/plan_constants.json with the command, for the planner. A second measurement raises the vocabulary from 2K to 32K and compares the bytes
kept per extra token: with the chunked loss they stay near zero (only a chunk x V block is ever alive, whatever
T); with full logits (train.loss_chunk=0) they are fp32 rows of logits and their gradient.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONSTANTS = Path(__file__).resolve().parent.parent / "pretrain" / "plan_constants.json"


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> None:
    import torch

    from pretrain.config import load_config
    from pretrain.distributed import init_process_group
    from pretrain.trainer import build_train_step

    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"--model.layers={args.layers}", f"--model.dim={args.dim}", f"--model.heads={args.heads}",
                             f"--model.glu_dim={args.glu}", f"--model.vocab_size={args.vocab}",
                             "--model.attn_backend=chunked", f"--train.activation_checkpointing={args.mode}",
                             f"--train.loss_chunk={args.loss_chunk}", "--train.device=cpu"])
    init_process_group("cpu")
    from parallel.mesh import build_mesh

    step = build_train_step(cfg, build_mesh(cfg.parallel))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, args.vocab, (1, args.seq), generator=g),
             "labels": torch.randint(0, args.vocab, (1, args.seq), generator=g)}
    step(batch)  # optimizer state exists from here on: the resting set
    rest = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(2):
        step(batch)
    print(json.dumps({"growth": _vm("VmHWM") - rest, "rest": rest}))


def measure(args, mode: str, seq: int, vocab: int, loss_chunk: int) -> int:
    cmd = [sys.executable, "-m", "bench.memory", "--child", "--mode", mode, "--seq", str(seq), "--vocab", str(vocab),
           "--loss-chunk", str(loss_chunk), "--layers", str(args.layers), "--dim", str(args.dim),
           "--heads", str(args.heads), "--glu", str(args.glu), "--threads", str(args.threads)]
    # glibc: every block over 64 KiB its own mapping (returned at free), one arena: RSS follows live memory
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), MALLOC_ARENA_MAX="1",
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


def words_per_token(args, mode: str) -> tuple[float, list[int]]:
    t1, t2 = args.seq
    g = [measure(args, mode, t, args.vocab, args.loss_chunk) for t in (t1, t2)]
    return (g[1] - g[0]) / ((t2 - t1) * args.layers * args.dim * 4), g


def per_layer_and_peak(args, mode: str) -> tuple[float, float]:
    """Split the words kept per token into a part per layer (what every block saves) and a part once per
    step (the peak of the block being recomputed or backpropagated, the loss): measured at layers/2 and layers."""
    half = dict(vars(args), layers=max(args.layers // 2, 1))
    w_full, _ = words_per_token(args, mode)
    w_half, _ = words_per_token(argparse.Namespace(**half), mode)
    s_full, s_half = w_full * args.layers, w_half * half["layers"]  # words per token per dim, whole model
    per_layer = (s_full - s_half) / (args.layers - half["layers"])
    return per_layer, s_full - per_layer * args.layers


def parse(argv):
    p = argparse.ArgumentParser(prog="lightspan bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--glu", type=int, default=0, help="SGLU width (default: 8/3 dim rounded to 64)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--modes", nargs="+", default=["none", "selective", "full"])
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="store the words per token in pretrain/plan_constants.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.glu:
        args.glu = max(64, round(8 * args.dim / 3 / 64) * 64)
    if args.child:
        args.seq = args.seq[0]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0
    load = os.getloadavg()[0]
    print(f"memory bench: {args.layers} layers x dim {args.dim} (glu {args.glu}, heads {args.heads}), vocab {args.vocab}, "
          f"one sequence, T = {args.seq[0]} and {args.seq[1]}, fp32, load average {load:.2f}")
    print(f"{'AC mode':>10} | {'words/token/layer/dim':>22} | growth at T1, T2 (MiB) | per layer + once per step")
    words, split = {}, {}
    t0 = time.time()
    for mode in args.modes:
        w, g = words_per_token(args, mode)
        words[mode] = w
        split[mode] = per_layer_and_peak(args, mode) if args.write else (float("nan"), float("nan"))
        print(f"{mode:>10} | {w:>22.2f} | {g[0] / 2**20:>6.1f}, {g[1] / 2**20:>6.1f}       | "
              f"{split[mode][0]:.2f} x layers + {split[mode][1]:.2f}")
    t1, t2 = args.seq

    def slope(vocab, chunk):  # bytes kept per extra token
        return (measure(args, "none", t2, vocab, chunk) - measure(args, "none", t1, vocab, chunk)) / (t2 - t1)

    chunked = slope(32768, args.loss_chunk) - slope(2048, args.loss_chunk)
    full = slope(32768, 0) - slope(2048, 0)
    print(f"vocabulary 2K -> 32K (AC none, per token between T={t1} and T={t2}): the chunked loss "
          f"(train.loss_chunk={args.loss_chunk}) adds {chunked / 1024:.2f} KiB per token; full logits "
          f"(train.loss_chunk=0) add {full / 1024:.1f} KiB per token (one fp32 logits row of 32K is 128 KiB)")
    print(f"({time.time() - t0:.0f} s)")
    if args.write:
        data = {"words_per_token_per_layer_per_dim": {m: round(w, 3) for m, w in words.items()},
                "per_layer": {m: round(v[0], 3) for m, v in split.items()},
                "once_per_step": {m: round(v[1], 3) for m, v in split.items()},
                "measured_with": "python -m bench.memory --write "
                                 f"--layers {args.layers} --dim {args.dim} --seq {args.seq[0]} {args.seq[1]}",
                "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, torch CPU, fp32"}
        CONSTANTS.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {CONSTANTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
