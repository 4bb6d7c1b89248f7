"""Lightning attention throughput against causal softmax attention, measured in the same run.

    lightspan bench lightning [--seqlens 2048,8192,32768,65536] [--heads 4] [--dim 64] [--batch 1]
    python -m bench.lightning ...

Times ``lightning_attn`` (chunked backend on CPU, triton on GPU) and torch SDPA (is_causal=True) at each T,
forward (no grad) and forward+backward, best of --reps after a warm-up, and prints tokens/s (B·T / seconds),
the speedups, and two ratios: ours vs SDPA fwd+bwd at the longest T where both ran, and our throughput at
that T vs at the shortest T (linear cost means close to 1). SDPA is quadratic: above --sdpa-max-t it is
skipped and marked so. On GPU, flash-attn and fla's chunk_simple_gla (g_gamma = -slope, scale 1) join
when importable.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from model.ops import lightning_attn


def tnl_slopes(H: int) -> torch.Tensor:
    """TNL/ALiBi base slopes 2^{-8(h+1)/H}, h = 0..H-1."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, reps: int, device, warmup: bool = True) -> float:
    """Best wall time of fn() over reps runs, after one warm-up run unless warmup is False."""
    if warmup:
        fn()
        _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def fwd_and_fwdbwd(call, inputs, reps: int, device, warmup: bool = True):
    """(forward seconds, forward+backward seconds) of call(*inputs) -> tensor."""
    grad = None

    def fwd():
        with torch.no_grad():
            call(*inputs)

    def fwdbwd():
        nonlocal grad
        for x in inputs:
            x.grad = None
        out = call(*inputs)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    return best_time(fwd, reps, device, warmup), best_time(fwdbwd, reps, device, warmup)


def make_calls(args, device):
    """name -> (fn(q, k, v) -> o, layout, quadratic) for every method available here; layout 'bhtd' or 'bthd'.
    The first entry is ours."""
    slope = tnl_slopes(args.heads).to(device)
    backend = args.backend
    calls = {
        f"lightning[{backend}]": (lambda q, k, v: lightning_attn(q, k, v, slope, backend=backend)[0], "bhtd", False),
        "sdpa_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "bhtd", True),
    }
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_func

            calls["flash_attn"] = (lambda q, k, v: flash_attn_func(q, k, v, causal=True), "bthd", True)
        except ImportError:
            pass
        try:
            from fla.ops.simple_gla import chunk_simple_gla

            def fla_call(q, k, v):
                return chunk_simple_gla(q, k, v, g_gamma=-slope, scale=1.0)[0]

            calls["fla_chunk_simple_gla"] = (fla_call, "bthd", False)
        except ImportError:
            pass
    return calls


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    calls = make_calls(args, device)
    rows = []
    for T in args.seqlens:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(args.batch, args.heads, T, args.dim, generator=g) * 0.3 for _ in range(3))
        row = {"T": T}
        for name, (call, layout, quadratic) in calls.items():
            if quadratic and T > args.sdpa_max_t:
                row[name] = None
                continue
            xs = [x if layout == "bhtd" else x.transpose(1, 2) for x in (q, k, v)]
            xs = [x.to(device, dtype).contiguous().requires_grad_() for x in xs]
            # a long quadratic run is measured once, without warm-up (it already ran warm at shorter T)
            long_quadratic = quadratic and T > 8192 and device.type == "cpu"
            f, fb = fwd_and_fwdbwd(call, xs, 1 if long_quadratic else args.reps, device, not long_quadratic)
            row[name] = (args.batch * T / f, args.batch * T / fb)
            print(f"  T={T:>6} {name:<22} fwd {f * 1e3:10.1f} ms  fwd+bwd {fb * 1e3:10.1f} ms", flush=True)
        rows.append(row)
    return rows


def report(rows, args) -> str:
    names = [n for n in rows[0] if n != "T"]
    ours = names[0]
    head = "| T | " + " | ".join(f"{n} fwd tok/s | {n} fwd+bwd tok/s" for n in names) + " | fwd+bwd speedup vs sdpa |"
    lines = [head, "|" + "---|" * (2 * len(names) + 2)]
    for r in rows:
        cells = []
        for n in names:
            cells += ["skipped (quadratic)"] * 2 if r[n] is None else [f"{r[n][0]:,.0f}", f"{r[n][1]:,.0f}"]
        sp = "-" if r["sdpa_causal"] is None else f"{r[ours][1] / r['sdpa_causal'][1]:.1f}x"
        lines.append(f"| {r['T']} | " + " | ".join(cells) + f" | {sp} |")
    both = [r for r in rows if r["sdpa_causal"] is not None]
    if both:
        r = both[-1]
        lines.append(f"\nours vs SDPA fwd+bwd at T={r['T']}: {r[ours][1] / r['sdpa_causal'][1]:.1f}x "
                     f"(fwd {r[ours][0] / r['sdpa_causal'][0]:.1f}x)")
    ref = max((r for r in rows if r["T"] <= 32768), key=lambda r: r["T"])
    first = rows[0]
    lines.append(f"ours fwd+bwd tokens/s at T={first['T']} / at T={ref['T']}: {first[ours][1] / ref[ours][1]:.2f} "
                 f"(fwd {first[ours][0] / ref[ours][0]:.2f}; 1.0 = linear cost)")
    return "\n".join(lines)


def parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="lightspan bench lightning", description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", default="2048,8192,32768,65536",
                   type=lambda s: [int(x) for x in s.split(",")], help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="head dim (Dk = Dv)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if cuda else "fp32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--backend", default="triton" if cuda else "chunked", help="lightning_attn backend")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch default); 1 is steadier on a shared, oversubscribed machine")
    p.add_argument("--sdpa-max-t", type=int, default=65536 if cuda else 32768,
                   help="skip quadratic baselines above this T (on CPU SDPA fwd+bwd at 32K takes about a minute)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"lightning attention bench: B={args.batch} H={args.heads} D={args.dim} {args.dtype} on {args.device} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    rows = run(args)
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
