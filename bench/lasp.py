"""Sequence-parallel communication and memory: LASP-2 vs Ulysses all-to-all vs ring K/V exchange.

    python -m bench.lasp [--cp 2 4 8] [--heads 16] [--head-dim 128] [--batch 1] [--act-bytes 2]

1. Counted. A real gloo run of a tiny TNL (forward + backward) at 2 and 4 ranks with the collectives wrapped
   (`dist.all_gather_single` / `all_gather_into_tensor`, `all_to_all_single`, `recv`): the bytes each rank
   receives are counted for LASP-2, LASP-1 and a minimal Ulysses reshard (q, k, v sequence->head, o head->sequence,
   with the inverse all-to-alls in the backward) around the same lightning-attention op. The counts must equal
   the per-layer formulas below (the bench says so and stops otherwise).
2. The formulas, evaluated for T = 8K .. 1M on a TNL-1B layer (H=16, head_dim 128; B=1): bytes received per
   rank per layer, forward + backward, and the ratio to LASP-2.

       LASP-2   2 (W-1) · B·H·Dk·Dv · 4            (all-gather of the fp32 state, then of dS; independent of T)
       LASP-1   ≤ 2 · B·H·Dk·Dv · 4                 (one state in, one dS in; but W-1 sequential hops)
       Ulysses  8 (W-1)/W · B·(T/W)·H·D · a         (q, k, v, o all-to-all; the same four in the backward)
       Ring     6 (W-1) · B·(T/W)·H·D · a           (K, V pass W-1 hops forward; K, V and dK, dV backward)

   a = bytes per activation element (2: bf16). Ring is the softmax ring attention's K/V traffic (not run here:
   formula only, as in the ring-attention papers).
3. Memory: per-rank peak RSS growth during one forward + backward of a small TNL at a fixed total T, unsharded
   (1 process) vs LASP-2 at 2 and 4 ranks (VmHWM reset via /proc/self/clear_refs before the step).
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.distributed as dist


# ----- formulas: bytes received per rank per layer, forward + backward ------------------------------------
def lasp2_bytes(W, B, H, Dk, Dv, state_bytes=4):
    return 2 * (W - 1) * B * H * Dk * Dv * state_bytes


def ulysses_bytes(W, T, B, H, D, act_bytes):
    return 8 * (W - 1) * B * (T // W) * H * D * act_bytes // W


def ring_bytes(W, T, B, H, D, act_bytes):
    return 6 * (W - 1) * B * (T // W) * H * D * act_bytes


# ----- counting the collectives actually issued ------------------------------------------------------------
class ByteCounter:
    """Wraps the torch.distributed calls LASP and Ulysses issue; counts the bytes this rank receives."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_to_all_single", "recv")

    def __init__(self):
        self.bytes = defaultdict(int)
        self._orig = {}

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                self._orig[name] = fn = getattr(dist, name)
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            W = dist.get_world_size(group)
            if name.startswith("all_gather"):
                self.bytes[name] += (W - 1) * args[1].nbytes  # everyone else's input
            elif name == "all_to_all_single":
                self.bytes[name] += (W - 1) * args[1].nbytes // W  # all blocks but the one kept
            else:
                self.bytes[name] += args[0].nbytes
            return fn(*args, **kwargs)

        return counted

    def total(self):
        return sum(self.bytes.values())


def _a2a(x, scatter_dim, gather_dim, group):
    """All-to-all: split x along scatter_dim into W blocks, send block j to rank j, concat received on gather_dim."""
    W = dist.get_world_size(group)
    send = torch.stack(x.chunk(W, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _Reshard(torch.autograd.Function):
    """Ulysses: (B, H, T/W, D) sequence shards <-> (B, H/W, T, D) head shards; backward is the inverse."""

    @staticmethod
    def forward(ctx, x, to_heads, group):
        ctx.to_heads, ctx.group = to_heads, group
        return _a2a(x, 1, 2, group) if to_heads else _a2a(x, 2, 1, group)

    @staticmethod
    def backward(ctx, g):
        return (_a2a(g, 2, 1, ctx.group) if ctx.to_heads else _a2a(g, 1, 2, ctx.group)), None, None


class UlyssesAttention:
    """attn_op strategy: Ulysses around the local op (lightning attention is per head, so this is exact)."""

    def __init__(self, group, backend="chunked"):
        self.group, self.backend = group, backend

    def __call__(self, q, k, v, slope, initial_state=None, output_final_state=False):
        from model.ops import lightning_attn

        r = dist.get_rank(self.group)
        q, k, v = (_Reshard.apply(x, True, self.group) for x in (q, k, v))
        h = q.shape[1]
        o, _ = lightning_attn(q, k, v, slope[r * h:(r + 1) * h], backend=self.backend)
        return _Reshard.apply(o, False, self.group), None


def _tiny_cfg(dim=64, layers=2, heads=4):
    from model import ModelConfig

    return ModelConfig(vocab_size=128, dim=dim, layers=layers, heads=heads, glu_dim=2 * dim, lrpe_layers=[0],
                       attn_backend="chunked")


def _count_worker(rank, world, T, B):
    from model import build_model
    from model.tnl import TokenMixer
    from parallel.lasp import apply_lasp, cp_position_offset

    cfg = _tiny_cfg()
    C = T // world
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))[:, rank * C:(rank + 1) * C]
    out = {}
    for impl in ("lasp2", "lasp1", "ulysses"):
        torch.manual_seed(0)
        model = build_model(cfg)
        if impl == "ulysses":
            for m in model.modules():
                if isinstance(m, TokenMixer):
                    m.attn_op = UlyssesAttention(dist.group.WORLD)
        else:
            apply_lasp(model, dist.group.WORLD, impl)
        with ByteCounter() as counter:
            model(ids, position_offset=cp_position_offset(rank, C)).float().square().mean().backward()
        out[impl] = counter.total()
    return out


def _expected(W, T, B, act_bytes):
    """Sum over the tiny model's layers of the formulas (LRPE doubles Dk on layer 0); fp32 activations."""
    cfg = _tiny_cfg()
    hd = cfg.head_dim
    dks = [2 * hd if layer in cfg.lrpe_layers else hd for layer in range(cfg.layers)]
    lasp2 = sum(lasp2_bytes(W, B, cfg.heads, dk, hd) for dk in dks)
    # q, k and their grads are Dk wide; v, o and their grads Dv wide: half of the eight all-to-alls each
    ulysses = sum((ulysses_bytes(W, T, B, cfg.heads, dk, act_bytes) + ulysses_bytes(W, T, B, cfg.heads, hd, act_bytes))
                  // 2 for dk in dks)
    return lasp2, ulysses


# ----- memory ---------------------------------------------------------------------------------------------
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _memory_worker(rank, world, T, dim, layers):
    from model import build_model
    from parallel.lasp import apply_lasp, cp_position_offset

    torch.manual_seed(0)
    model = build_model(_tiny_cfg(dim, layers, heads=4))
    if world > 1:
        apply_lasp(model, dist.group.WORLD, "lasp2")
    C = T // world
    ids = torch.randint(0, 128, (1, C), generator=torch.Generator().manual_seed(rank))
    model(ids[:, :16]).float().square().mean().backward()  # warm-up: first-call allocations stay out of the peak
    model.zero_grad(set_to_none=True)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = False
    base = _rss_kib("VmRSS")
    model(ids, position_offset=cp_position_offset(rank, C)).float().square().mean().backward()
    peak = _rss_kib("VmHWM")
    return (peak - base) / 1024 if resettable else float("nan")


def _mib(n):
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def main(argv=None) -> int:
    from parallel.harness import run_distributed

    p = argparse.ArgumentParser(prog="lightspan bench lasp", description=__doc__.split("\n")[0])
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8], help="cp sizes for the formula table")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--act-bytes", type=int, default=2, help="bytes per activation element (2: bf16)")
    p.add_argument("--mem-T", type=int, default=8192, help="total tokens of the memory run")
    p.add_argument("--mem-dim", type=int, default=64)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)

    # 1. counted vs formula
    T, B = 64, 2
    print(f"## counted in a gloo run: bytes received per rank, fwd+bwd, whole model (tiny TNL: dim 64, 2 layers, "
          f"4 heads, LRPE on layer 0; T={T}, B={B}, fp32)")
    print("| cp | LASP-2 counted | LASP-2 formula | LASP-1 counted | Ulysses counted | Ulysses formula |")
    print("|---|---|---|---|---|---|")
    for W in (2, 4):
        counted = run_distributed(_count_worker, W, (T, B))
        lasp2_f, ulysses_f = _expected(W, T, B, act_bytes=4)
        for impl, want in (("lasp2", lasp2_f), ("ulysses", ulysses_f)):
            got = {c[impl] for c in counted}
            if got != {want}:
                raise SystemExit(f"{impl} at cp={W}: counted {sorted(got)} bytes per rank, formula {want}")
        lasp1 = max(c["lasp1"] for c in counted)
        print(f"| {W} | {_mib(counted[0]['lasp2'])} | {_mib(lasp2_f)} | {_mib(lasp1)} (max rank) | "
              f"{_mib(counted[0]['ulysses'])} | {_mib(ulysses_f)} |")
    print("counted == formula on every rank.\n")

    # 2. the formulas at scale
    H, D, B, a = args.heads, args.head_dim, args.batch, args.act_bytes
    print(f"## bytes received per rank per layer, fwd+bwd (H={H}, head_dim={D}, B={B}, fp32 state, "
          f"{a}-byte activations)")
    print("| T | cp | LASP-2 | Ulysses | Ring K/V | Ulysses / LASP-2 | Ring / LASP-2 |")
    print("|---|---|---|---|---|---|---|")
    for T in (8192, 32768, 131072, 262144, 1048576):
        for W in args.cp:
            l2 = lasp2_bytes(W, B, H, D, D)
            u, r = ulysses_bytes(W, T, B, H, D, a), ring_bytes(W, T, B, H, D, a)
            print(f"| {T // 1024}K | {W} | {_mib(l2)} | {_mib(u)} | {_mib(r)} | {u / l2:,.1f}x | {r / l2:,.1f}x |")

    # 3. memory
    if not args.skip_memory:
        Tm, dim = args.mem_T, args.mem_dim
        print(f"\n## per-rank peak RSS growth of one fwd+bwd (TNL dim {dim}, 2 layers, T={Tm} total, LASP-2)")
        print("| cp | per-rank peak RSS growth | vs cp=1 |")
        print("|---|---|---|")
        base = None
        for W in (1, 2, 4):
            mib = max(run_distributed(_memory_worker, W, (Tm, dim, 2)))
            base = base or mib
            print(f"| {W} | {mib:,.1f} MiB (max rank) | {mib / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
