"""Long-context cost of SharedLLM-TNL vs plain TNL vs the softmax (Llama) baseline, measured in the same run.

    python -m bench.attention [--contexts 8192,16384,32768,65536] [--dim 64] [--layers 2] [--budget 30]

At each total context T (batch 1, fp32, forward+backward of a summed-logits loss; --forward-only for
inference), each model runs in its own spawned process so its peak memory is its own:
- tnl:       TransnormerLM over all T tokens (lightning attention: linear in T);
- llama:     LlamaLM of the same dims over all T tokens (causal SDPA: quadratic in T);
- sharedllm: SharedLLM-TNL with the same layers, M = 1 lower layer: the first T - --text tokens as
             1024-token context chunks (depth-3 tree, 32 positions per node), the last --text tokens as
             running text.
Prints tokens/s (T / seconds, best of --reps after a short warm-up), the peak resident memory the run added
(VmHWM minus the resident size before the timed runs; Linux /proc), and each model's throughput as a ratio
of plain TNL's at the same T. A model whose run at some T took longer than --budget seconds (or that is
predicted to, from its previous size and its complexity) is skipped at larger T and marked "skipped".
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time

MODELS = ("tnl", "llama", "sharedllm")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(kind: str, args):
    import torch

    from model import ModelConfig, build_model

    common = dict(vocab_size=args.vocab, dim=args.dim, layers=args.layers, heads=args.heads, glu_dim=2 * args.dim,
                  lrpe_layers=[0], attn_backend="chunked")
    torch.manual_seed(0)
    if kind == "llama":
        return build_model(ModelConfig(arch="llama", **common))
    if kind == "tnl":
        return build_model(ModelConfig(arch="tnl", **common))
    return build_model(ModelConfig(arch="sharedllm", sharedllm_layers=1, sharedllm_chunk=1024, sharedllm_depth=3,
                                   sharedllm_node_positions=32, **common))


def _run_one(kind: str, T: int, args, queue) -> None:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    model = _build(kind, args)
    g = torch.Generator().manual_seed(1)

    def inputs(total):
        if kind != "sharedllm":
            return (torch.randint(0, args.vocab, (1, total), generator=g),)
        n = (total - args.text) // 1024
        return (torch.randint(0, args.vocab, (1, args.text), generator=g),
                torch.randint(0, args.vocab, (1, n, 1024), generator=g))

    def run(xs):  # SharedLLM: (running text, context chunks); the others: (ids,)
        return model(xs[0], context_chunks=xs[1]) if len(xs) > 1 else model(xs[0])

    def step(xs):
        if args.forward_only:
            with torch.no_grad():
                run(xs)
        else:
            run(xs).float().sum().backward()
            model.zero_grad(set_to_none=True)

    step(inputs(min(T, args.text + 2048)))  # warm-up on a short input
    xs = inputs(T)
    base = _rss_kib("VmRSS")
    can_reset = _reset_peak()
    best = float("inf")
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step(xs)
        best = min(best, time.perf_counter() - t0)
    peak = _rss_kib("VmHWM") - base if can_reset else float("nan")
    queue.put((T / best, best, peak / 1024))


def measure(kind: str, T: int, args) -> tuple[float, float, float]:
    """(tokens/s, seconds, peak MiB added) of one model at context T, in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_run_one, args=(kind, T, args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        raise RuntimeError(f"{kind} at T={T} failed (exit code {proc.exitcode})")
    return queue.get()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lightspan bench attention", description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="8192,16384,32768,65536")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--text", type=int, default=1024, help="SharedLLM running-text tokens (the rest is context)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per run before larger sizes are skipped")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--forward-only", action="store_true")
    args = ap.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",")]
    models = args.models.split(",")
    if any(m not in MODELS for m in models):
        ap.error(f"--models: choose from {MODELS}")
    if any((t - args.text) < 1024 or (t - args.text) % 1024 for t in contexts) and "sharedllm" in models:
        ap.error(f"each context minus --text ({args.text}) must be a positive multiple of the 1024-token chunk")
    growth = {"tnl": 2.0, "sharedllm": 2.0, "llama": 4.0}  # time per doubling of T: linear vs quadratic

    mode = "fwd" if args.forward_only else "fwd+bwd"
    print(f"# bench attention: {mode}, batch 1, dim {args.dim}, heads {args.heads}, layers {args.layers}, fp32, "
          f"budget {args.budget:.0f}s/run; sharedllm: M=1, 1024-token chunks -> 128 positions, text {args.text}")
    print(f"{'T':>7} {'model':>10} {'tokens/s':>10} {'seconds':>8} {'peak MiB':>9} {'vs tnl':>7}")
    last: dict[str, tuple[int, float]] = {}
    for T in contexts:
        row = {}
        for kind in models:
            if kind in last:
                prev_T, prev_s = last[kind]
                predicted = prev_s * growth[kind] ** math.log2(T / prev_T)
                if prev_s > args.budget or predicted > args.budget:
                    print(f"{T:>7} {kind:>10} {'skipped':>10}   "
                          f"(predicted {predicted:.0f}s > budget {args.budget:.0f}s)")
                    continue
            tps, secs, peak = measure(kind, T, args)
            last[kind] = (T, secs)
            row[kind] = tps
            ratio = f"{tps / row['tnl']:.2f}x" if "tnl" in row else "-"
            print(f"{T:>7} {kind:>10} {tps:>10.0f} {secs:>8.2f} {peak:>9.1f} {ratio:>7}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
